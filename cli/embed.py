"""``minrr embed``: embeddings (or hash codes) of a data set through a trained model.

Besides h(x), it writes the inputs of the other commands: noisy embeddings h(x + z)
(``--sigma``, ``--samples``; for ``minrr certify --embeddings``), streamed into a
memory-mapped ``.npy``, and the archive of a hashing model's outputs on clean and
transformed images that a detector reads (``--detector umcd``: ``f`` and ``f_t``, for
``minrr detect``; :func:`minrr.backends.detection.detector_outputs`).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from minrr.cli.outputs import Files

FLAGS = {"batch_size": "--batch-size", "device": "--device", "model": "--model", "sigma": "--sigma",
         "n_samples": "--samples", "seed": "--seed", "x": "--data", "images": "--data"}
NOISY_BATCH = 1000


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
    p.add_argument("--out", required=True, metavar="emb.npy",
                   help="embeddings, (N, dim); with --sigma, (N, n, dim) noisy embeddings; with --detector, "
                        "an .npz archive of the outputs a detector reads ('f' and 'f_t' for umcd)")
    p.add_argument("--labels-out", metavar="y.npy", help="also write the data's (N,) int64 labels")
    p.add_argument("--codes", action="store_true", help="hashing models: write sign(f) as int8 +-1 (sign(0) = +1)")
    p.add_argument("--sigma", type=float, metavar="S",
                   help="write n noisy embeddings h(x + z), z ~ N(0, S^2 I), of every image: (N, n, dim) float32, "
                        "for minrr certify --embeddings (needs --samples)")
    p.add_argument("--samples", type=int, metavar="N", help="with --sigma, n: noisy copies of each image")
    p.add_argument("--seed", type=int, default=0,
                   help="with --sigma, the noise seed (default: 0); one stream per image, as minrr certify --model")
    p.add_argument("--detector", metavar="NAME",
                   help="hashing models: write an .npz archive of the outputs the detector NAME reads: umcd (for "
                        "minrr detect): f on the images and f_t on their 3 x 3 mean-blurred copies; or a baseline of "
                        "minrr.hashing.detection_baselines (feature-squeezing, fs-median, fs-nlm, fs-adaptive, mean-blur, lid): "
                        "f and its transformed outputs (f_median, ...)")
    p.add_argument("--batch-size", type=int,
                   help=f"images (noisy copies with --sigma) per forward pass (default: 256; {NOISY_BATCH} with "
                        "--sigma); results do not depend on it")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda when available)")
    p.set_defaults(run=run)


def _check_modes(args) -> None:
    """The three outputs exclude each other: h(x) (or codes), noisy h(x + z), or a detector's outputs."""
    if (args.sigma is None) != (args.samples is None):
        raise ValueError("--samples: --sigma and --samples go together (n noisy copies at noise level sigma)")
    if args.sigma is not None and (args.codes or args.detector):
        raise ValueError(f"--sigma: not with {'--codes' if args.codes else '--detector'}")
    if args.detector is not None:
        if args.codes:
            raise ValueError("--detector: not with --codes (the archive holds the continuous outputs f)")
        if not args.out.endswith(".npz"):
            raise ValueError(f"--out: with --detector, expected an .npz archive name, got {args.out}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a whole number >= 1, got {args.batch_size}")


def _check_disk(path, shape) -> None:
    """Refuse before any work a float32 array of ``shape`` that the disk of ``path`` cannot hold."""
    size = math.prod(shape) * 4
    free = shutil.disk_usage(Path(path).absolute().parent).free
    if size > free:
        raise ValueError(f"--out: {' x '.join(map(str, shape))} float32 embeddings need {size / 1e9:.3g} GB; "
                         f"{free / 1e9:.3g} GB are free there")


def _write_noisy(path, backend, model, images, args, shape) -> None:
    """(N, n, dim) float32 noisy embeddings, written into a memory-mapped .npy as they come."""
    draws = backend.noisy_embeddings(model, images, args.sigma, args.samples, seed=args.seed,
                                     batch_size=args.batch_size or NOISY_BATCH, progress=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    for j, start, h in draws:
        out[j, start:start + len(h)] = h
    out.flush()
    del out


def run(args) -> int:
    from minrr.backends import get_backend
    from minrr.backends.checkpoint import card_path, load_checkpoint
    from minrr.data.loaders import load_dataset

    _check_modes(args)
    files = Files.of(args, inputs=["--model", "--data", "--labels"], outputs=["--out", "--labels-out"])
    files.input("--model", card_path(args.model))
    files.check()
    backend = get_backend("torch", device=args.device)
    model, card = load_checkpoint(args.model, device=backend.device, name="--model")
    if (args.codes or args.detector) and card["embedding"]["head"] != "hash":
        raise ValueError(f"--{'codes' if args.codes else 'detector'}: {args.model} is an embedding model, "
                         "not a hashing model")
    size = tuple(card["input"]["shape"][1:])
    data = load_dataset(args.data, args.labels, size=size, name="--data", labels_name="--labels")
    if data.images.shape[1] != model.spec.in_channels:
        raise ValueError(f"--data: images with {data.images.shape[1]} channels; the model takes "
                         f"{model.spec.in_channels}")
    if args.sigma is not None:
        shape = (len(data), args.samples, model.spec.dim)
        _check_disk(args.out, shape)
        with files.commit() as tmp:
            _write_noisy(tmp["--out"], backend, model, data.images, args, shape)
            _write_labels(tmp, data)
        what = f"{' x '.join(map(str, shape))} noisy embeddings (sigma {args.sigma:g})"
    elif args.detector is not None:
        from minrr.backends.detection import detector_outputs

        outputs = detector_outputs(model, data.images, args.detector, batch_size=args.batch_size or 256,
                                   progress=True)
        with files.commit() as tmp:
            with open(tmp["--out"], "wb") as fh:  # float32 model outputs: float32 loses nothing
                np.savez(fh, **{key: value.astype(np.float32) for key, value in outputs.items()})
            _write_labels(tmp, data)
        what = f"{', '.join(outputs)} ({args.detector}), {' x '.join(map(str, outputs['f'].shape))} each,"
    else:
        out = backend.embed(model, data.images, batch_size=args.batch_size or 256, progress=True)
        out = np.where(out >= 0, 1, -1).astype(np.int8) if args.codes else out.astype(np.float32, copy=False)
        with files.commit() as tmp:
            with open(tmp["--out"], "wb") as fh:
                np.save(fh, out)
            _write_labels(tmp, data)
        what = f"{out.shape[0]} x {out.shape[1]} {'codes' if args.codes else 'embeddings'}"
    print(f"wrote {args.out}: {what} of {data.source}" + (f", labels in {args.labels_out}" if args.labels_out else ""))
    return 0


def _write_labels(tmp: dict, data) -> None:
    if "--labels-out" in tmp:
        with open(tmp["--labels-out"], "wb") as fh:
            np.save(fh, data.labels)
