"""``minrr train``: train a base model (triplet + semi-hard mining, GDML noise, or CSQ hashing)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from minrr.cli.outputs import Files

# Library argument names (minrr.backends) that are not a flag's dest.
FLAGS = {"images": "--data", "x": "--data"}


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
    _register_defence(p)
    p.set_defaults(run=run)


def _register_defence(p) -> None:
    """Flags of adversarial training (minrr.backends.defences); a setting left out takes the defence's default."""
    from minrr.cli.attack import fraction

    p.add_argument("--defense", default="none", choices=("none", "naive", "act", "hm", "colo-tride", "freeat"),
                   help="adversarial training: naive, act, hm or colo-tride (dml), freeat (hash); default: none")
    p.add_argument("--attack-eps", type=fraction, metavar="EPS",
                   help="l-inf radius of the training attack, pixels in [0, 1] (default: 8/255)")
    p.add_argument("--attack-alpha", type=fraction, metavar="ALPHA",
                   help="PGD step of the training attack (default: 1/255; colo-tride ramps it by t/T)")
    p.add_argument("--attack-steps", type=int, metavar="N",
                   help="PGD steps of the training attack (default: 8; colo-tride 16)")
    p.add_argument("--collapse-lambda", type=float, metavar="LAMBDA",
                   help="colo-tride: attention factor lambda of the collapseness (default: 10)")
    p.add_argument("--replays", type=int, metavar="M", help="freeat: times each batch is replayed (default: 4)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run from OUT with .resume.pt (written after every epoch) instead of "
                        "starting afresh; its settings must be this command's")



def _load(args):
    from minrr.data.loaders import load_dataset

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
    from minrr.data.loaders import to_unit_float

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


def _files(args) -> Files:
    from minrr.backends.checkpoint import check_card_replaceable, check_weights_path

    check_weights_path(args.out, name="--out")
    files = Files.of(args, inputs=["--data", "--labels", "--test-data", "--test-labels"])
    sides = _side_paths(args.out)
    files.output("--out", args.out, beside=sides,
                 replaceable=lambda path: check_card_replaceable(path, name="--out")
                 if path == sides["model card"] else None)
    return files


def _build(spec, seed: int, images: np.ndarray):
    """The untrained model, checked on two of the images: too small an image or too large a
    network is a ValueError naming the flag, not a torch error."""
    import torch

    from minrr.backends.models import build_model
    from minrr.data.loaders import to_unit_float

    try:
        model = build_model(spec, seed=seed)
    except RuntimeError as exc:
        raise ValueError(f"--dim: cannot build a {spec.arch} of width {spec.width} and dim {spec.dim} "
                         f"({str(exc).splitlines()[0]})") from None
    try:
        with torch.no_grad():
            model.eval()(torch.from_numpy(to_unit_float(images[:2], np.float32)))
    except RuntimeError:
        raise ValueError(f"--data: images of {images.shape[2]} x {images.shape[3]} pixels are too small for "
                         f"{spec.arch}; give larger images, or --image-size with a folder of images") from None
    return model.train()


def _side_paths(out) -> dict:
    """Files written beside OUT: the model card, the per-epoch diagnostics (CSV, and a PNG plot when
    matplotlib is installed) and the resume file (after every epoch; removed when the run ends)."""
    from minrr.backends.checkpoint import card_path

    out = Path(out)
    return {"model card": card_path(out), "diagnostics": out.with_suffix(".diagnostics.csv"),
            "diagnostics plot": out.with_suffix(".diagnostics.png"), "resume file": out.with_suffix(".resume.pt")}


def _run_settings(args, data, defence: dict) -> str:
    """Everything that determines the weights, as JSON: a resume file must match it."""
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(data.images).tobytes())
    digest.update(np.ascontiguousarray(data.labels).tobytes())
    keys = ("task", "arch", "dim", "width", "epochs", "batch_size", "lr", "margin", "per_class", "noise_sigma",
            "csq_lambda", "seed", "image_size", "test_data")
    return json.dumps({**{k: getattr(args, k) for k in keys}, "defense": defence, "data_sha256": digest.hexdigest()},
                      sort_keys=True)


def _read_resume(path: Path, settings: str) -> dict:
    import torch

    if not path.is_file():
        raise ValueError(f"--resume: there is no resume file {path}; run without --resume to start")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: torch raises many kinds
        raise ValueError(f"--resume: {path} is not a minrr resume file ({str(exc).strip().splitlines()[0]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("settings"), str):
        raise ValueError(f"--resume: {path} is not a minrr resume file")
    if state["settings"] != settings:
        theirs, ours = json.loads(state["settings"]), json.loads(settings)
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        raise ValueError(f"--resume: {path} was written by a run with other settings ({', '.join(differ)}); "
                         "run without --resume to start afresh")
    return state


def _write_diagnostics(path: Path, rows: list) -> None:
    from minrr.backends.defences import DIAGNOSTICS
    from minrr.io import atomic_path

    lines = [",".join(DIAGNOSTICS)] + [f"{int(r[0])}," + ",".join(f"{v:.6g}" for v in r[1:]) for r in rows]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _plot_diagnostics(path: Path, rows: list) -> None:
    """One panel per diagnostic against the epoch (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from minrr.backends.defences import DIAGNOSTICS
    from minrr.io import atomic_path

    values = np.asarray(rows, dtype=float)
    fig, axes = plt.subplots(2, 4, figsize=(14, 6), constrained_layout=True)
    for ax, column in zip(axes.flat, range(1, len(DIAGNOSTICS))):
        ax.plot(values[:, 0], values[:, column], marker="o")
        ax.set_title(DIAGNOSTICS[column].replace("_", " "))
        ax.set_xlabel("epoch")
        if DIAGNOSTICS[column] in ("collapseness", "separability", "train_separability"):
            ax.axhline(0.0, color="grey", linewidth=0.8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _fit(args, model, data, test, backend, defence: dict) -> list:
    """Train with the defence, saving the resume file and the diagnostics after every epoch;
    returns the loss of every step."""
    import torch
    from tqdm import tqdm

    from minrr.backends.defences import DIAGNOSTICS, fit
    from minrr.io import atomic_path

    sides = _side_paths(args.out)
    settings = _run_settings(args, data, defence)
    resume = _read_resume(sides["resume file"], settings) if args.resume else None
    if test is not None:
        held_out = (test.images, test.labels)
    else:  # a fixed, evenly spread probe of at most 1000 training images
        every = max(1, len(data) // 1000)
        held_out = (data.images[::every][:1000], data.labels[::every][:1000])

    def on_epoch(state, optimizer):
        with atomic_path(sides["resume file"]) as tmp:
            torch.save({**state.state_dict(model, optimizer), "settings": settings}, tmp)
        _write_diagnostics(sides["diagnostics"], state.diagnostics)
        row = dict(zip(DIAGNOSTICS, state.diagnostics[-1]))
        tqdm.write(f"minrr train: epoch {state.epoch}/{args.epochs}: loss {row['loss']:.4f}, collapseness "
                   f"{row['collapseness']:+.4f}, separability {row['separability']:.3f}, "
                   f"R@1 {row['recall_at_1']:.3f}", file=sys.stderr)  # above a progress bar, if any

    state = fit(model, data.images, data.labels, task=args.task, defense=args.defense, settings=defence,
                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, margin=args.margin,
                noise_sigma=args.noise_sigma, per_class=args.per_class, csq_lambda=args.csq_lambda, seed=args.seed,
                held_out=held_out, backend=backend, progress=True, resume=resume, on_epoch=on_epoch)
    if not state.history:
        raise ValueError("--data: no training step could be taken (no batch has a usable triplet)")
    return state.history


def _finish_sides(out) -> None:
    """After the checkpoint is written: the diagnostics plot (with matplotlib), and no resume file."""
    import importlib.util

    sides = _side_paths(out)
    if importlib.util.find_spec("matplotlib") is not None and sides["diagnostics"].is_file():
        rows = np.loadtxt(sides["diagnostics"], delimiter=",", skiprows=1, ndmin=2)
        _plot_diagnostics(sides["diagnostics plot"], rows.tolist())
    sides["resume file"].unlink(missing_ok=True)


def run(args) -> int:
    from minrr.backends import get_backend
    from minrr.backends.base import check_whole
    from minrr.backends.checkpoint import card_path, save_checkpoint
    from minrr.backends.models import ModelSpec
    from minrr.backends.defences import defence_settings
    from minrr.backends.training import evaluate

    files = _files(args)
    files.check()
    check_whole(args.seed, "seed", 0)
    if args.seed >= 1 << 63:
        raise ValueError(f"--seed: expected a whole number below 2**63, got {args.seed}")
    defence = defence_settings(args.task, args.defense, attack_eps=args.attack_eps, attack_alpha=args.attack_alpha,
                               attack_steps=args.attack_steps, collapse_lambda=args.collapse_lambda,
                               replays=args.replays)
    backend = get_backend("torch", device=args.device)
    data, test = _load(args)
    mean, std = _channel_stats(data.images)
    dim = args.dim if args.dim is not None else (128 if args.task == "dml" else 64)
    spec = ModelSpec(args.arch, int(data.images.shape[1]), "embedding" if args.task == "dml" else "hash", dim,
                     width=args.width, mean=mean, std=std,
                     stem="small" if max(data.images.shape[2:]) <= 64 else "imagenet")
    model = _build(spec, args.seed, data.images)
    started = time.perf_counter()
    history = _fit(args, model, data, test, backend, defence)
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
        "defense": defence, "diagnostics": {"file": _side_paths(args.out)["diagnostics"].name,
                                            "split": "--test-data" if test is not None else "training probe"},
    }
    data_section = {"train": _portable(data.source), "test": None if test is None else _portable(test.source),
                    "train_items": len(data), "classes": len(np.unique(data.labels)),
                    "class_names": None if data.classes is None else list(data.classes),
                    "image_size": [int(v) for v in data.images.shape[2:]]}
    save_checkpoint(args.out, model, input_shape=data.images.shape[1:], data=data_section,
                    training=training, metrics=metrics, name="--out")
    what = f"{dim}-d embedding" if args.task == "dml" else f"{dim}-bit hash"
    print(f"trained {args.arch} ({what}) on {data.source}: {len(history)} steps in {seconds:.1f} s, "
          f"loss {history[0]:.4f} -> {history[-1]:.4f}")
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"  {key} {value:.4f}")
    _finish_sides(args.out)
    print(f"wrote {args.out} and {card_path(args.out)}")
    return 0
