"""``minrr embed``: embeddings (or hash codes) of a data set through a trained model."""

from __future__ import annotations

import sys

import numpy as np

from minrr.cli.flags import flag_message
from minrr.data.loaders import load_dataset
from minrr.io import atomic_path, check_output_path

FLAGS = {"batch_size": "--batch-size", "device": "--device", "model": "--model"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed images with a trained model (minrr train) and write an .npy array",
        description="Run a checkpoint of minrr train over a data set and write its (N, dim) embeddings "
                    "as float32 .npy (or, with --codes, the +-1 codes of a hashing model as int8). The "
                    "output feeds minrr certify --gallery and minrr search. Needs PyTorch.",
    )
    p.add_argument("--model", required=True, metavar="model.pt",
                   help="weights file; its model card (.json) must be beside it")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="images: bundled:train|test, fashion-mnist:train|test, a folder with one sub-folder "
                        "per class, images.npz, or images.npy / an IDX file with --labels")
    p.add_argument("--labels", metavar="y.npy", help="labels of --data when it is a .npy or IDX image file")
    p.add_argument("--out", required=True, metavar="emb.npy", help="embeddings, (N, dim)")
    p.add_argument("--labels-out", metavar="y.npy", help="also write the data's (N,) int64 labels")
    p.add_argument("--codes", action="store_true", help="hashing models: write sign(f) as int8 +-1 (sign(0) = +1)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda when available)")
    p.set_defaults(run=run)



def run(args) -> int:
    try:
        from minrr.backends import get_backend
        from minrr.backends.checkpoint import load_checkpoint

        for flag in ("out", "labels_out"):
            check_output_path(getattr(args, flag), name=f"--{flag.replace('_', '-')}")
        backend = get_backend("torch", device=args.device)
        model, card = load_checkpoint(args.model, device=backend.device, name="--model")
        if args.codes and card["embedding"]["head"] != "hash":
            raise ValueError(f"--codes: {args.model} is an embedding model, not a hashing model")
        size = tuple(card["input"]["shape"][1:])
        data = load_dataset(args.data, args.labels, size=size, name="--data", labels_name="--labels")
        if data.images.shape[1] != model.spec.in_channels:
            raise ValueError(f"--data: images with {data.images.shape[1]} channels; the model takes "
                             f"{model.spec.in_channels}")
        out = backend.embed(model, data.images, batch_size=args.batch_size, progress=sys.stderr.isatty())
    except (ValueError, TypeError) as exc:
        raise type(exc)(flag_message(exc, FLAGS)) from None
    out = np.where(out >= 0, 1, -1).astype(np.int8) if args.codes else out.astype(np.float32, copy=False)
    with atomic_path(args.out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, out)
    if args.labels_out:
        with atomic_path(args.labels_out) as tmp, open(tmp, "wb") as fh:
            np.save(fh, data.labels)
    kind = "codes" if args.codes else "embeddings"
    print(f"wrote {args.out}: {out.shape[0]} x {out.shape[1]} {kind} of {data.source}"
          + (f", labels in {args.labels_out}" if args.labels_out else ""))
    return 0
