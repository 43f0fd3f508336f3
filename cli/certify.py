"""``minrr certify``: certified Recall@k from embeddings, from a trained model, or on the bundled default data."""

from __future__ import annotations

import json
import sys

import numpy as np

from minrr.certify import bounds
from minrr.cli.cluster import add_cluster_flags, check_cluster_flags
from minrr.cli.flags import flag_message
from minrr.io import load_npy

from minrr.options import (CERTIFICATES, DEFAULT_CANDIDATES, DEFAULT_RADII, DEFAULT_SAMPLES, DEFAULT_SIGMAS,
                           RADIUS_FORMS)

TSV_COLUMNS = ("idx", "label", "nn_label", "correct", "margin", "margin_lower", "radius",
               "bound", "sigma", "alpha", "n", "certificate")

# Library argument names, as the messages of minrr.certify name them, and their flags.
FLAGS = {
    "queries": "--embeddings", "query_labels": "--labels", "gallery": "--gallery",
    "gallery_labels": "--gallery-labels", "norm_bound": "--norm-bound", "n_samples": "--samples",
    "sigma": "--sigma", "alpha": "--alpha", "bound": "--bound", "k": "--top-k",
    "x": "--data", "device": "--device", "batch_size": "--batch-size", "seed": "--seed",
    "certificate": "--certificate",
}
MODEL_FLAGS = ("data", "gallery_data", "device", "batch_size", "skip", "max", "scheduler", "workers")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "certify",
        help="certified l2 radius of Recall@k for a Gaussian-smoothed embedding (RetrievalGuard)",
        description="Certify Recall@k of a Gaussian-smoothed embedding model from Monte-Carlo "
                    "embeddings, or straight from a trained model (--model: noise is sampled through "
                    "it, and an interrupted run resumes). Without --embeddings or --model, runs the "
                    "bundled default: a Fashion-MNIST subset, an LDA embedding learned at run time, "
                    "and several sigmas.",
    )
    p.add_argument("--embeddings", metavar="E.npy",
                   help="query embeddings: (N, n, dim) noisy samples, or (N, dim) Monte-Carlo means "
                        "(then --samples is required)")
    p.add_argument("--model", metavar="model.pt",
                   help="a checkpoint of minrr train (its model card beside it): sample --samples noisy "
                        "copies of each --data image through it; needs PyTorch")
    p.add_argument("--data", metavar="SOURCE",
                   help="with --model, the query images: bundled:train|test, fashion-mnist:train|test, a "
                        "folder with one sub-folder per class, images.npz, or images.npy / an IDX file with "
                        "--labels (default: the model card's test data)")
    p.add_argument("--gallery-data", metavar="SOURCE",
                   help="with --model, the gallery images, embedded exactly by the model (default: the model "
                        "card's training data); --gallery-labels for .npy or IDX images")
    p.add_argument("--labels", metavar="y.npy",
                   help="query labels: (N,) integers or (N, C) multi-hot; with --model, the labels of --data")
    p.add_argument("--sigma", type=float,
                   help="noise level of the smoothing in input units (required with --embeddings and --model; "
                        f"the bundled default runs {', '.join(map(str, DEFAULT_SIGMAS))})")
    p.add_argument("--gallery", metavar="G.npy",
                   help="(M, dim) exact gallery embeddings, or (M, n, dim) noisy samples (a Monte-Carlo "
                        "gallery); default: leave-one-out over the queries' smoothed embeddings")
    p.add_argument("--gallery-labels", metavar="gy.npy",
                   help="gallery labels, like --labels; with --model, the labels of --gallery-data")
    p.add_argument("--norm-bound", type=float, metavar="F",
                   help="bound F on the base embedding's norm; may be omitted when every sample has "
                        "norm 1 within 1e-4 (with --model: the model card's, 1 or sqrt(K) bits)")
    p.add_argument("--alpha", type=float, default=1e-3,
                   help="failure probability of each certificate (default: 0.001)")
    p.add_argument("--bound", choices=bounds.BOUNDS, default=bounds.BOUNDS[0],
                   help="concentration bound on the Monte-Carlo error (default: %(default)s; 'paper' "
                        "reproduces RetrievalGuard's printed formula)")
    p.add_argument("--samples", type=int, metavar="N",
                   help="Monte-Carlo draws behind each mean (required with (N, dim) means and with --model; "
                        f"the bundled default draws {DEFAULT_SAMPLES})")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="certify Recall@K (default: 1)")
    p.add_argument("--certificate", choices=CERTIFICATES, default=CERTIFICATES[0],
                   help="'halfspace' (default): one linear condition per pair of gallery items, never smaller "
                        "than RetrievalGuard's; 'retrievalguard': the margin and the Lipschitz bound of the "
                        "paper (with --bound paper, the paper's certificate exactly)")
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, metavar="C",
                   help=f"halfspace: the C nearest relevant items tried as e+, the best kept (default: "
                        f"{DEFAULT_CANDIDATES}); each costs about one more GEMM over the gallery")
    p.add_argument("--radius-form", choices=RADIUS_FORMS, default="phi",
                   help="'phi': 2 sigma Phi^-1(1/2 + d/(8F)) (default); 'linear': the Lipschitz form "
                        "(RetrievalGuard's radius)")
    p.add_argument("--radii", metavar="R1,R2,...",
                   help="radii at which to report certified recall (default: 0 to 3 sigma; the "
                        f"bundled default uses {', '.join(map(str, DEFAULT_RADII))})")
    p.add_argument("--precision", choices=("float32", "float64"), default="float32",
                   help="precision of the distance GEMM; rounding is accounted for either way "
                        "(default: float32)")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed of the bundled default and of --model (default: 0); one stream per query")
    p.add_argument("--device", help="with --model, the torch device, e.g. cpu or cuda (default: cuda when available)")
    p.add_argument("--skip", type=int, metavar="S",
                   help="with --model, certify every S-th query of --data only (indices 0, S, 2S, ...; as Cohen et "
                        "al.'s certify.py)")
    p.add_argument("--max", type=int, metavar="M",
                   help="with --model, certify only queries with an index below M (as Cohen et al.'s certify.py)")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="with --model, noisy copies per forward pass (default: 1000); results do not depend on it "
                        "beyond floating-point rounding")
    add_cluster_flags(p, title="scale-out on a Dask cluster (with --model; needs minrr[distributed])",
                      work="each worker loads --model once", chunk=("queries", 8, "8"))
    p.add_argument("--out", metavar="results.tsv",
                   help="write one row per query (TSV); with --model, rows go to results.tsv.partial as they "
                        "are made, and a rerun with the same settings resumes from it")
    p.add_argument("--json", metavar="summary.json", help="write the summary as JSON")
    p.add_argument("--plot", metavar="curve.pdf",
                   help="draw certified recall against radius: .pdf, .svg or .png, the format following the "
                        "extension (needs matplotlib); minrr plot redraws and compares TSV files")
    p.set_defaults(run=run)


def _parse_radii(text: str) -> np.ndarray:
    try:
        radii = np.array([float(v) for v in text.split(",")])
    except ValueError:
        raise ValueError(f"--radii: expected comma-separated numbers, got {text!r}") from None
    if np.any(~np.isfinite(radii)) or np.any(radii < 0):
        raise ValueError("--radii: radii must be finite and >= 0")
    return radii


def _check_arguments(args) -> None:
    if args.plot:
        from minrr.cli.plotting import check_plot_path

        check_plot_path(args.plot, name="--plot")
    if args.candidates < 1:
        raise ValueError(f"--candidates: expected a whole number >= 1, got {args.candidates}")
    if args.top_k < 1:
        raise ValueError(f"--top-k: expected a whole number >= 1, got {args.top_k}")
    if args.seed < 0:
        raise ValueError(f"--seed: expected a whole number >= 0, got {args.seed}")
    if args.samples is not None and args.samples < 2:
        raise ValueError(f"--samples: expected at least 2 draws, got {args.samples}")
    if args.model is not None:
        _check_model_arguments(args)
        return
    for flag in MODEL_FLAGS:
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')}: given without --model")
    if args.embeddings is None:
        for flag in ("labels", "gallery", "gallery_labels", "norm_bound"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')}: given without --embeddings")
        return
    if args.labels is None:
        raise ValueError("--labels: required with --embeddings")
    if args.sigma is None:
        raise ValueError("--sigma: required with --embeddings")
    if (args.gallery is None) != (args.gallery_labels is None):
        raise ValueError("--gallery-labels: --gallery and --gallery-labels go together")


def _check_model_arguments(args) -> None:
    if args.embeddings is not None:
        raise ValueError("--model: give either --model or --embeddings, not both")
    if args.gallery is not None:
        raise ValueError("--gallery: with --model, give gallery images with --gallery-data")
    if args.gallery_labels is not None and args.gallery_data is None:
        raise ValueError("--gallery-labels: with --model, it goes with --gallery-data")
    if args.sigma is None:
        raise ValueError("--sigma: required with --model")
    if args.samples is None:
        raise ValueError("--samples: required with --model (noisy copies of each query)")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a whole number >= 1, got {args.batch_size}")
    check_cluster_flags(args)
    for flag in ("skip", "max"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag}: expected a whole number >= 1, got {getattr(args, flag)}")


def _load_embeddings(path, flag):
    arr = load_npy(path, name=flag, mmap=True)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{flag}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"{flag}: expected (N, dim) or (N, n, dim) embeddings, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{flag}: is empty (shape {arr.shape})")
    return arr


def _run_files(args, radii):
    from minrr.certify import certify, default_radii
    from minrr.labels import check_labels, check_top_k

    queries = _load_embeddings(args.embeddings, "--embeddings")
    labels = load_npy(args.labels, name="--labels")
    gallery = gallery_labels = None
    if args.gallery is not None:
        gallery = _load_embeddings(args.gallery, "--gallery")
        gallery_labels = load_npy(args.gallery_labels, name="--gallery-labels")
    if queries.ndim == 2 and args.samples is None:
        raise ValueError("--samples: required when --embeddings holds (N, dim) Monte-Carlo means")
    check_top_k(args.top_k, check_labels(labels, name="query_labels"),
                check_labels(labels if gallery_labels is None else gallery_labels, name="gallery_labels"))
    result = certify(queries, labels, sigma=args.sigma, gallery=gallery, gallery_labels=gallery_labels,
                     n_samples=args.samples if queries.ndim == 2 else None, norm_bound=args.norm_bound,
                     alpha=args.alpha, bound=args.bound, top_k=args.top_k,
                     radius_form=args.radius_form, precision=args.precision, certificate=args.certificate,
                     candidates=args.candidates)
    return [result], default_radii(args.sigma) if radii is None else radii


def _label_text(label) -> str:
    label = np.asarray(label)
    return str(int(label)) if label.ndim == 0 else ",".join(str(c) for c in np.flatnonzero(label))


def tsv_row(idx: int, result, i: int) -> str:
    """The TSV line of query ``i`` of ``result``, numbered ``idx``.

    Margins and radii are written in full (Python's shortest repr, which reads back to the same
    float), so a radius is never rounded up and a summary built from the file is exact.
    """
    s = result.settings
    return (f"{idx}\t{_label_text(result.label[i])}\t{_label_text(result.nearest_label[i])}\t"
            f"{int(result.correct[i])}\t{float(result.margin[i])!r}\t{float(result.margin_lower[i])!r}\t"
            f"{float(result.radius[i])!r}\t{s['bound']}\t{s['sigma']:g}\t{s['alpha']:g}\t{s['n']}\t"
            f"{s['certificate']}\n")


def _write_tsv(path, results) -> None:
    with open(path, "w") as fh:
        fh.write("\t".join(TSV_COLUMNS) + "\n")
        for result in results:
            for i in range(len(result.margin)):
                fh.write(tsv_row(i, result, i))


def _print_summary(results, radii, source) -> None:
    from minrr.certify import certified_recall

    s0 = results[0].settings
    k = s0["top_k"]
    print(f"{source}")
    print(f"certificate {s0['certificate']}, bound {s0['bound']}, alpha {s0['alpha']:g}, n {s0['n']}, "
          f"F {s0['norm_bound']:g}, gallery {s0['gallery']}, radius form {s0['radius_form']}, "
          f"{len(results[0].margin)} queries")
    cells = [f"r={r:.4g}" for r in radii]
    width = max(7, *(len(c) for c in cells))
    print(f"certified Recall@{k} at radius r (share of queries certified with radius >= r):")
    print(f"{'sigma':>6}  {'clean R@' + str(k):>10}  " + "  ".join(c.rjust(width) for c in cells)
          + f"  {'not cert.':>9}  {'median r':>9}")
    for result in results:
        cert = certified_recall(result, radii)
        print(f"{result.settings['sigma']:>6g}  {result.correct.mean():>10.3f}  "
              + "  ".join(f"{c:>{width}.3f}" for c in cert)
              + f"  {1 - result.certified.mean():>9.3f}  {np.median(result.radius):>9.4g}")


def _files(args):
    """Inputs and outputs of this run, checked before any work (see :mod:`minrr.cli.outputs`)."""
    from minrr.cli.certify_model import partial_path
    from minrr.cli.outputs import Files

    files = Files.of(args, inputs=["--embeddings", "--model", "--data", "--labels", "--gallery", "--gallery-data",
                                   "--gallery-labels"])
    if args.model is not None:
        from minrr.backends.checkpoint import card_path

        files.input("--model", card_path(args.model))
    files.output("--out", args.out, beside={"partial result": partial_path(args.out)} if args.model and args.out
                 else None)
    files.output("--json", args.json)
    files.output("--plot", args.plot)
    files.check()
    return files


def run(args) -> int:
    from minrr.bundled import run_bundled
    from minrr.certify import default_radii, summarize

    files = _files(args)
    try:
        _check_arguments(args)
        radii = None if args.radii is None else _parse_radii(args.radii)
        if args.model is not None:
            from minrr.cli.certify_model import run_model

            results, source, rows = run_model(args)
            radii = default_radii(args.sigma) if radii is None else radii
        elif args.embeddings is None:
            sigmas = DEFAULT_SIGMAS if args.sigma is None else (args.sigma,)
            print("minrr certify: no --embeddings given, running the bundled default: 1,000 Fashion-MNIST "
                  "test images certified against 5,000 training images (an l2-normalised LDA embedding "
                  "learned now, Gaussian noise sampled in NumPy)", file=sys.stderr)
            results = run_bundled(sigmas, n_samples=args.samples or DEFAULT_SAMPLES, alpha=args.alpha,
                                  bound=args.bound, top_k=args.top_k, radius_form=args.radius_form,
                                  seed=args.seed, certificate=args.certificate, candidates=args.candidates)
            radii = np.array(DEFAULT_RADII) if radii is None else radii
            source = "bundled default: Fashion-MNIST subset, LDA embedding"
        else:
            results, radii = _run_files(args, radii)
            source = f"embeddings: {args.embeddings}"
    except (ValueError, TypeError) as exc:
        raise type(exc)(flag_message(exc, FLAGS)) from None

    with files.commit() as tmp:  # --out, --json and --plot: all or none
        if args.out and args.model is not None:
            rows.write(tmp["--out"])
        elif args.out:
            _write_tsv(tmp["--out"], results)
        if args.json:
            payload = {"source": source, "runs": [summarize(r, radii) for r in results]}
            tmp["--json"].write_text(json.dumps(payload, indent=2) + "\n")
        if args.plot:
            from minrr.cli.plotting import check_plot_path, curves_from_results, draw_curves

            draw_curves(curves_from_results(results), tmp["--plot"], check_plot_path(args.plot, name="--plot"))
    if args.out and args.model is not None:
        rows.remove_partial()  # only now that the final file is in place
    _print_summary(results, radii, source)
    return 0
