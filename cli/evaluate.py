"""``minrr evaluate``: benign retrieval metrics of embeddings (or of a model), under pytorch-metric-learning's keys."""

from __future__ import annotations

import json

import numpy as np

from minrr.cli.cluster import add_cluster_flags, check_cluster_flags, cluster, on_cluster
from minrr.cli.outputs import Files
from minrr.io import load_rows_file, rows_shape

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
    p.add_argument("--embeddings", metavar="E.npy|DIR",
                   help="(N, dim) query embeddings, e.g. from minrr embed; or a folder of .npy shards, stacked along "
                        "rows in the order of their file names (part-00000.npy, part-00001.npy, ...)")
    p.add_argument("--labels", metavar="y.npy|DIR",
                   help="(N,) integer or (N, C) multi-hot labels of --embeddings (a file or a folder of shards); with "
                        "--model, the labels of --data when it is a .npy or IDX image file")
    p.add_argument("--gallery", metavar="G.npy|DIR",
                   help="(M, dim) gallery embeddings, a file or a folder of shards (default: the queries themselves)")
    p.add_argument("--gallery-labels", metavar="gy.npy|DIR",
                   help="labels of --gallery (a file or a folder of shards); with --model, the labels of "
                        "--gallery-data")
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
    p.add_argument("--no-nmi", action="store_true",
                   help="leave NMI out: its k-means costs O(N x classes x dim) per iteration, minutes at the scale "
                        "of Stanford Online Products (60,000 x 512, 11,318 classes)")
    p.add_argument("--device", help="with --model, the torch device (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=256, help="with --model, images per forward pass (default: 256)")
    p.add_argument("--json", metavar="metrics.json", help="write the metrics as JSON")
    add_cluster_flags(p, title="scale-out on a Dask cluster (with --embeddings; needs minrr[distributed])",
                      work="each worker loads the embeddings and labels once, from paths it can read, and ranks "
                           "its chunks of queries against the whole gallery (NMI is computed by this process)",
                      chunk=("queries", None, "N / (4 x the cluster's threads), at least 256"))
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
    elif on_cluster(args):
        raise ValueError(f"--{'scheduler' if args.scheduler is not None else 'workers'}: works on --embeddings "
                         "(embed with minrr embed first)")
    else:
        if args.gallery is not None:
            raise ValueError("--gallery: with --model, give gallery images with --gallery-data")
        if args.gallery_labels is not None and args.gallery_data is None:
            raise ValueError("--gallery-labels: with --model, it goes with --gallery-data")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size: expected a whole number >= 1, got {args.batch_size}")
    if args.exclude is not None and (args.gallery is not None or args.gallery_data is not None):
        raise ValueError("--exclude: only without a gallery (a separate gallery excludes nothing)")
    check_cluster_flags(args)


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


def _ranking_inputs(args) -> dict:
    """The --embeddings inputs under the library's names: loaded here, or left as paths for the workers to load."""
    paths = {"embeddings": args.embeddings, "labels": args.labels, "gallery": args.gallery,
             "gallery_labels": args.gallery_labels}
    if on_cluster(args):
        from pathlib import Path

        return {name: None if path is None else str(Path(path).resolve()) for name, path in paths.items()}
    return {name: None if path is None else load_rows_file(path, name=FLAGS[name]) for name, path in paths.items()}


def _metrics(args, ks, inputs: dict) -> dict:
    """Recall@k, mAP, mAP@R and R-precision of ``inputs``, in this process or on the cluster; NMI here."""
    from minrr.metrics.clustering import kmeans_nmi
    from minrr.metrics.report import retrieval_metrics, summarise

    ranking = {"gallery": inputs["gallery"], "gallery_labels": inputs["gallery_labels"], "exclude": args.exclude}
    if not on_cluster(args):
        return retrieval_metrics(inputs["embeddings"], inputs["labels"], ks=ks, seed=args.seed, nmi=not args.no_nmi,
                                 **ranking)
    from minrr.backends.distributed import query_statistics_chunks

    with cluster(args) as client:
        metrics = summarise(query_statistics_chunks(client, inputs["embeddings"], inputs["labels"],
                                                    chunk_size=args.chunk_size, **ranking), ks)
    if not args.no_nmi and len(rows_shape(args.labels, name="--labels")) == 1:
        metrics["NMI"] = kmeans_nmi(load_rows_file(args.embeddings, name="--embeddings"),
                                    load_rows_file(args.labels, name="--labels"), seed=args.seed)
    return metrics


def _rows(value, flag: str) -> int:
    """Rows of an input: an array, or the path a worker will load."""
    return len(value) if isinstance(value, np.ndarray) else rows_shape(value, name=flag)[0]


def run(args) -> int:
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
        inputs = {"embeddings": queries, "labels": labels, "gallery": gallery, "gallery_labels": gallery_labels}
    else:
        inputs = _ranking_inputs(args)
        source = f"embeddings: {args.embeddings}" + (f", gallery {args.gallery}" if args.gallery is not None else "")
    metrics = _metrics(args, ks, inputs)

    n_queries = _rows(inputs["embeddings"], "--embeddings")
    protocol = PROTOCOL[args.exclude or "index"] if inputs["gallery"] is None else \
        f"queries against a gallery of {_rows(inputs['gallery'], '--gallery')}"
    if args.json:
        payload = {"source": source, "queries": int(n_queries), "protocol": protocol, "metrics": metrics}
        with files.commit() as tmp:
            tmp["--json"].write_text(json.dumps(payload, indent=2) + "\n")
    print(source)
    print(f"{n_queries} queries, {protocol}")
    width = max(len(key) for key in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}")
    if args.json:
        print(f"wrote {args.json}")
    return 0
