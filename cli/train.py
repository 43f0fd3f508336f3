"""``minrr train``: train a base model (triplet + semi-hard mining, GDML noise, or CSQ hashing)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from minrr.cli.flags import flag_message
from minrr.data.loaders import load_dataset, to_unit_float

FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "per_class": "--per-class", "lr": "--lr",
         "noise_sigma": "--noise-sigma", "task": "--task", "device": "--device", "dim": "--dim",
         "width": "--width", "margin": "--margin", "csq_lambda": "--csq-lambda"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an embedding (dml) or hashing (hash) model and write a checkpoint with its model card",
        description="Train a small CNN or a ResNet-18 on labelled images: metric learning with the "
                    "triplet loss and semi-hard mining, optionally with Gaussian noise augmentation "
                    "(GDML, for certification), or CSQ deep hashing. Writes OUT (a state_dict) and "
                    "OUT with .json (the model card). Needs PyTorch.",
    )
    p.add_argument("--task", required=True, choices=("dml", "hash"),
                   help="dml: l2-normalised embeddings, triplet loss; hash: K-bit tanh codes, CSQ loss")
    p.add_argument("--out", required=True, metavar="model.pt",
                   help="weights file; the model card goes beside it (.json)")
    p.add_argument("--arch", choices=("small-cnn", "resnet18"), default="small-cnn",
                   help="network (default: small-cnn)")
    p.add_argument("--data", default="bundled:train", metavar="SOURCE",
                   help="training images: bundled:train|test, fashion-mnist:train|test, a folder with one "
                        "sub-folder per class, images.npz, or images.npy / an IDX file with --labels "
                        "(default: bundled:train)")
    p.add_argument("--labels", metavar="y.npy", help="labels of --data when it is a .npy or IDX image file")
    p.add_argument("--test-data", metavar="SOURCE", help="held-out images for the benign metrics of the model card")
    p.add_argument("--test-labels", metavar="y.npy", help="labels of --test-data, like --labels")
    p.add_argument("--image-size", type=int, metavar="S", help="resize the images of a folder to S x S")
    p.add_argument("--dim", type=int, help="embedding size (dml, default 128) or K bits (hash, default 64)")
    p.add_argument("--width", type=int, help="channels of the first stage (default: 32 small-cnn, 64 resnet18)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the data (default: 10)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    p.add_argument("--margin", type=float, default=0.2, help="triplet margin (dml; default: 0.2)")
    p.add_argument("--per-class", type=int, default=4, help="images of each class in a dml batch (default: 4)")
    p.add_argument("--noise-sigma", type=float, default=0.0,
                   help="std of Gaussian noise added to training images, in pixel units (GDML; default: 0)")
    p.add_argument("--csq-lambda", type=float, default=1e-4,
                   help="weight of CSQ's quantisation term (hash; default: 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, batches and noise (default: 0)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda when available)")
    p.set_defaults(run=run)



def _load(args):
    size = None if args.image_size is None else (args.image_size, args.image_size)
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size: expected a whole number >= 1, got {args.image_size}")
    train = load_dataset(args.data, args.labels, size=size, name="--data", labels_name="--labels")
    test = None
    if args.test_data is not None:
        test = load_dataset(args.test_data, args.test_labels, size=size, name="--test-data",
                            labels_name="--test-labels")
        if test.images.shape[1:] != train.images.shape[1:]:
            raise ValueError(f"--test-data: images of shape {test.images.shape[1:]}, the training images' "
                             f"are {train.images.shape[1:]}")
    elif args.test_labels is not None:
        raise ValueError("--test-labels: given without --test-data")
    return train, test


def _portable(source: str) -> str:
    """A source as the model card records it: files and folders by absolute path."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the pixels in [0, 1], a chunk of images at a time."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for start in range(0, len(images), 4096):
        chunk = to_unit_float(images[start:start + 4096], np.float64)
        total += chunk.sum(axis=(0, 2, 3))
        squares += np.square(chunk).sum(axis=(0, 2, 3))
    count = len(images) * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    return mean.tolist(), np.where(std > 1e-6, std, 1.0).tolist()


def run(args) -> int:
    try:
        from minrr.backends import get_backend
        from minrr.backends.checkpoint import card_path, check_weights_path, save_checkpoint
        from minrr.backends.models import ModelSpec, build_model
        from minrr.backends.training import evaluate, train

        backend = get_backend("torch", device=args.device)
        check_weights_path(args.out, name="--out")
        data, test = _load(args)
        mean, std = _channel_stats(data.images)
        dim = args.dim if args.dim is not None else (128 if args.task == "dml" else 64)
        spec = ModelSpec(args.arch, int(data.images.shape[1]), "embedding" if args.task == "dml" else "hash", dim,
                         width=args.width, mean=mean, std=std,
                         stem="small" if max(data.images.shape[2:]) <= 64 else "imagenet")
        model = build_model(spec, seed=args.seed)
        started = time.perf_counter()
        history = train(model, data.images, data.labels, task=args.task, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, margin=args.margin, noise_sigma=args.noise_sigma,
                        per_class=args.per_class, csq_lambda=args.csq_lambda, seed=args.seed, backend=backend,
                        progress=sys.stderr.isatty())
        seconds = time.perf_counter() - started
        metrics = {}
        if test is not None:
            metrics = evaluate(model, args.task, test.images, test.labels, database=data.images,
                               database_labels=data.labels, backend=backend)
            metrics = {**metrics, "queries": test.source,
                       "protocol": "test split, each query leaving itself out" if args.task == "dml"
                       else "test queries against the training set, Hamming ranking, mAP@all"}
        training = {
            "task": args.task, "loss": "triplet, semi-hard negatives" if args.task == "dml" else "CSQ",
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "optimizer": "Adam",
            "margin": args.margin if args.task == "dml" else None,
            "per_class": args.per_class if args.task == "dml" else None,
            "csq_lambda": args.csq_lambda if args.task == "hash" else None,
            "noise_sigma": args.noise_sigma, "seed": args.seed, "device": str(backend.device),
            "steps": len(history), "first_loss": history[0], "final_loss": history[-1], "seconds": round(seconds, 1),
        }
        data_section = {"train": _portable(data.source), "test": None if test is None else _portable(test.source),
                        "train_items": len(data), "classes": len(np.unique(data.labels)),
                        "class_names": None if data.classes is None else list(data.classes),
                        "image_size": [int(v) for v in data.images.shape[2:]]}
        save_checkpoint(args.out, model, input_shape=data.images.shape[1:], data=data_section,
                        training=training, metrics=metrics, name="--out")
    except (ValueError, TypeError) as exc:
        raise type(exc)(flag_message(exc, FLAGS)) from None
    what = f"{dim}-d embedding" if args.task == "dml" else f"{dim}-bit hash"
    print(f"trained {args.arch} ({what}) on {data.source}: {len(history)} steps in {seconds:.1f} s, "
          f"loss {history[0]:.4f} -> {history[-1]:.4f}")
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"  {key} {value:.4f}")
    print(f"wrote {args.out} and {card_path(args.out)}")
    return 0
