"""``minrr evaluate``: benign retrieval metrics of embeddings (or of a model), under pytorch-metric-learning's keys."""

from __future__ import annotations

import json

from minrr.cli.outputs import Files
from minrr.io import load_npy

# Library argument names, as minrr.metrics messages start, and their flags.
FLAGS = {"embeddings": "--embeddings", "labels": "--labels", "gallery": "--gallery",
         "gallery_labels": "--gallery-labels", "ks": "--recall-at", "exclude": "--exclude", "x": "--data",
         "batch_size": "--batch-size", "device": "--device"}
PROTOCOL = {"index": "queries = gallery, each query leaving itself out", "nearest": "queries = gallery, each query "
            "leaving out the first item of its ranking (robrank)"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="Recall@k, mAP, mAP@R, R-precision and NMI of embeddings or of a trained model",
        description="Benign retrieval metrics of (N, dim) embeddings, or of a checkpoint of minrr train run over a "
                    "data set: Recall@k, mAP, mAP@R, R-precision and NMI, printed and written as JSON under "
                    "pytorch-metric-learning's AccuracyCalculator keys (precision_at_1, recall_at_k for k > 1, "
                    "mean_average_precision, mean_average_precision_at_r, r_precision, NMI). Without a gallery "
                    "the queries are their own gallery, each leaving itself out (robrank's protocol).",
    )
    p.add_argument("--embeddings", metavar="E.npy", help="(N, dim) query embeddings, e.g. from minrr embed")
    p.add_argument("--labels", metavar="y.npy",
                   help="(N,) integer or (N, C) multi-hot labels of --embeddings; with --model, the labels of --data "
                        "when it is a .npy or IDX image file")
    p.add_argument("--gallery", metavar="G.npy", help="(M, dim) gallery embeddings (default: the queries themselves)")
    p.add_argument("--gallery-labels", metavar="gy.npy",
                   help="labels of --gallery; with --model, the labels of --gallery-data")
    p.add_argument("--model", metavar="model.pt",
                   help="a checkpoint of minrr train (its model card beside it): embed --data (and --gallery-data) "
                        "first; needs PyTorch")
    p.add_argument("--data", metavar="SOURCE",
                   help="with --model, the query images: bundled:train|test, fashion-mnist:train|test, a folder with "
                        "one sub-folder per class, images.npz, or images.npy / an IDX file with --labels (default: "
                        "the model card's test data)")
    p.add_argument("--gallery-data", metavar="SOURCE", help="with --model, gallery images (default: none, the queries)")
    p.add_argument("--recall-at", default="1,2,4,8", metavar="K1,K2,...",
                   help="the k of Recall@k (default: 1,2,4,8); Recall@1 is always reported, as precision_at_1")
    p.add_argument("--exclude", choices=("index", "nearest"),
                   help="without a gallery, what each query leaves out of its ranking: itself (index, default) or "
                        "the first item of its ranking (nearest, robrank's code)")
    p.add_argument("--seed", type=int, default=0, help="seed of the k-means behind NMI (default: 0)")
    p.add_argument("--device", help="with --model, the torch device (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=256, help="with --model, images per forward pass (default: 256)")
    p.add_argument("--json", metavar="metrics.json", help="write the metrics as JSON")
    p.set_defaults(run=run)


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--recall-at: expected comma-separated whole numbers, got {text!r}") from None
    if any(k < 1 for k in ks):
        raise ValueError(f"--recall-at: expected whole numbers >= 1, got {text!r}")
    return ks


def _check_arguments(args) -> None:
    if (args.embeddings is None) == (args.model is None):
        raise ValueError("--embeddings: give either --embeddings or --model (with --data)")
    if args.seed < 0:
        raise ValueError(f"--seed: expected a whole number >= 0, got {args.seed}")
    if args.embeddings is not None:
        for flag in ("data", "gallery_data", "device"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')}: given without --model")
        if args.labels is None:
            raise ValueError("--labels: required with --embeddings")
        if (args.gallery is None) != (args.gallery_labels is None):
            raise ValueError("--gallery-labels: --gallery and --gallery-labels go together")
    else:
        if args.gallery is not None:
            raise ValueError("--gallery: with --model, give gallery images with --gallery-data")
        if args.gallery_labels is not None and args.gallery_data is None:
            raise ValueError("--gallery-labels: with --model, it goes with --gallery-data")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size: expected a whole number >= 1, got {args.batch_size}")
    if args.exclude is not None and (args.gallery is not None or args.gallery_data is not None):
        raise ValueError("--exclude: only without a gallery (a separate gallery excludes nothing)")


def _embed_model(args):
    """Query (and gallery) embeddings and labels through --model, and a line saying where they came from."""
    from minrr.backends import get_backend
    from minrr.backends.checkpoint import load_checkpoint
    from minrr.cli.certify_model import load_data

    backend = get_backend("torch", device=args.device)
    model, card = load_checkpoint(args.model, device=backend.device, name="--model")
    parts = [load_data(args.data, args.labels, card, "test", "--data", "--labels")]
    if args.gallery_data is not None:
        parts.append(load_data(args.gallery_data, args.gallery_labels, card, "train", "--gallery-data",
                               "--gallery-labels"))
    out = []
    for (data, _), flag in zip(parts, ("--data", "--gallery-data")):
        if data.images.shape[1] != model.spec.in_channels:
            raise ValueError(f"{flag}: images with {data.images.shape[1]} channels; the model takes "
                             f"{model.spec.in_channels}")
        out += [backend.embed(model, data.images, batch_size=args.batch_size, progress=True), data.labels]
    gallery = f", gallery {parts[1][1]}" if len(parts) > 1 else ""
    return (out + [None, None])[:4], f"model: {args.model}, queries {parts[0][1]}{gallery}"


def run(args) -> int:
    from minrr.metrics.report import retrieval_metrics

    _check_arguments(args)
    files = Files.of(args, inputs=["--embeddings", "--labels", "--gallery", "--gallery-labels", "--model"],
                     outputs=["--json"])
    if args.model is not None:
        from minrr.backends.checkpoint import card_path

        files.input("--model", card_path(args.model))  # the model card beside the weights is read too
    files.check()
    ks = _parse_ks(args.recall_at)
    if args.model is not None:
        (queries, labels, gallery, gallery_labels), source = _embed_model(args)
    else:
        queries = load_npy(args.embeddings, name="--embeddings")
        labels = load_npy(args.labels, name="--labels")
        gallery = None if args.gallery is None else load_npy(args.gallery, name="--gallery")
        gallery_labels = None if args.gallery_labels is None else load_npy(args.gallery_labels,
                                                                            name="--gallery-labels")
        source = f"embeddings: {args.embeddings}" + (f", gallery {args.gallery}" if gallery is not None else "")
    metrics = retrieval_metrics(queries, labels, ks=ks, gallery=gallery, gallery_labels=gallery_labels,
                                exclude=args.exclude, seed=args.seed)

    protocol = PROTOCOL[args.exclude or "index"] if gallery is None else f"queries against a gallery of {len(gallery)}"
    if args.json:
        payload = {"source": source, "queries": int(len(queries)), "protocol": protocol, "metrics": metrics}
        with files.commit() as tmp:
            tmp["--json"].write_text(json.dumps(payload, indent=2) + "\n")
    print(source)
    print(f"{len(queries)} queries, {protocol}")
    width = max(len(key) for key in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}")
    if args.json:
        print(f"wrote {args.json}")
    return 0
