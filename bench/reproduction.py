"""What the reproduction scripts (``bench/reproduce_*.py``) share: their options, a resumable
store of finished steps and trained models, the data, and the results folder.

A script builds an :class:`Experiment` from its parsed options and wraps each costly piece of
work in :meth:`Experiment.step` (JSON-ready results) or :meth:`Experiment.train` (a model):
a finished piece is written to the work folder at once, under a name and the settings that
determine it, and a rerun with the same options loads it instead of redoing it. Training
also saves its state after every epoch, so an interrupted run resumes inside a model.

Quick mode (``--quick``) runs on the subset of Fashion-MNIST that ships with minrr (5,000 +
1,000 images) at small sizes, so that CI can run every script in seconds; full mode reads the
whole Fashion-MNIST (Debian package ``dataset-fashion-mnist``) and writes the committed
results under ``bench/results/reproduction/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from minrr.data.loaders import load_dataset
from minrr.io import atomic_path

RESULTS = Path(__file__).resolve().parent / "results"
"""Where full runs write: ``RESULTS / "reproduction"`` (tables, figures, JSON)."""


def parser(description: str) -> argparse.ArgumentParser:
    """The options every reproduction script takes (a script adds its own)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="bundled Fashion-MNIST subset, small sizes: seconds on 2 cores (the CI check)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0, help="seed of every model, sample and attack (default: 0)")
    p.add_argument("--work", type=Path,
                   help="folder of finished steps and models, for resuming (default: ~/.cache/minrr-reproduction/"
                        "NAME-MODE-seedS)")
    p.add_argument("--out", type=Path,
                   help="folder of the tables, figures and JSON (default: bench/results/reproduction, "
                        "or WORK/results with --quick)")
    p.add_argument("--fresh", action="store_true", help="ignore finished steps in the work folder and redo them")
    return p


def sizes_of(args: argparse.Namespace, defaults: dict, p: argparse.ArgumentParser) -> dict:
    """The run's sizes: ``defaults["quick"]`` or ``defaults["full"]`` (name -> value), each overridden
    by its flag when given (``--cw-steps`` sets ``cw_steps``). A whole-number size below 1 is a usage
    error (exit 2)."""
    sizes = dict(defaults["quick" if args.quick else "full"])
    for name in sizes:
        if getattr(args, name, None) is not None:
            sizes[name] = getattr(args, name)
    for name, value in sizes.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, int) and v < 1 for v in values):
            p.error(f"--{name.replace('_', '-')}: expected whole numbers >= 1, got {value}")
    return sizes


def command(script: str, sizes: dict, args: argparse.Namespace) -> str:
    """The command that regenerates a page: ``python bench/SCRIPT``, ``--quick`` when given, every
    size written out (None: left at its default), the seed, and the device when one was given."""
    flags = ["--quick"] if args.quick else []
    for name, value in sizes.items():
        if value is not None:
            values = value if isinstance(value, list) else [value]
            flags.append(f"--{name.replace('_', '-')} " + " ".join(map(str, values)))
    flags.append(f"--seed {args.seed}")
    flags += [f"--device {args.device}"] if args.device else []
    return f"python bench/{script} " + " ".join(flags)


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class Experiment:
    """One run of a reproduction script: its sizes, work folder, output folder and backend.

    name : the script's short name (``retrievalguard``, ``umcd``, ``colotride``).
    args : the parsed options of :func:`parser`.
    """

    def __init__(self, name: str, args: argparse.Namespace):
        from minrr.backends.torch_backend import TorchBackend

        self.name, self.quick, self.seed, self.fresh = name, args.quick, args.seed, args.fresh
        mode = "quick" if args.quick else "full"
        self.work = args.work or Path.home() / ".cache" / "minrr-reproduction" / f"{name}-{mode}-seed{args.seed}"
        self.out = args.out or (self.work / "results" if args.quick else RESULTS / "reproduction")
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.backend = TorchBackend(device=args.device)
        self.started = time.monotonic()
        self.machine = self._machine()

    def _machine(self) -> str:
        """The machine, as it was when this work folder's run started (kept in it, so that a rerun
        which loads the finished steps names the machine and load that computed them)."""
        import torch

        from machine import describe

        record = self.work / "machine.txt"
        if self.fresh or not record.is_file():
            with atomic_path(record) as tmp:
                tmp.write_text(describe(np, torch) + "\n")
        return record.read_text().strip()

    # ---- messages -----------------------------------------------------------------------------
    def log(self, message: str) -> None:
        """One line on stderr, with the time since the start."""
        elapsed = int(time.monotonic() - self.started)
        print(f"reproduce {self.name} [{elapsed // 60}:{elapsed % 60:02d}]: {message}", file=sys.stderr, flush=True)

    # ---- data ---------------------------------------------------------------------------------
    def data(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Images (N, 1, 28, 28) uint8 (the backends read them as pixels in [0, 1]) and labels (N,)
        of Fashion-MNIST's ``split`` ("train" or "test"): the bundled subset in quick mode, the
        Debian package's full set otherwise; the first ``limit`` of a seeded class-balanced order
        when ``limit`` is given."""
        source = f"{'bundled' if self.quick else 'fashion-mnist'}:{split}"
        data = load_dataset(source, name="data")
        images, labels = data.images, np.asarray(data.labels)
        if limit is not None and limit < len(labels):
            order = np.random.default_rng(self.seed).permutation(len(labels))
            rank = np.empty(len(labels), dtype=np.int64)  # position of each item within its class
            for c in np.unique(labels):
                members = order[labels[order] == c]
                rank[members] = np.arange(len(members))
            chosen = order[np.lexsort((np.arange(len(order)), rank[order]))][:limit]
            chosen.sort()
            images, labels = images[chosen], labels[chosen]
        return images, labels

    # ---- resumable steps ------------------------------------------------------------------------
    def step(self, key: str, settings: dict, compute):
        """The JSON-ready result of ``compute()``, loaded from the work folder when a finished step
        of this ``key`` has the same ``settings``, otherwise computed and saved there at once."""
        path = self.work / f"{key}.json"
        if path.is_file() and not self.fresh:
            saved = json.loads(path.read_text())
            if saved.get("settings") == json.loads(json.dumps(settings)):
                self.log(f"{key}: finished before, loaded from {path}")
                return saved["result"]
        self.log(f"{key}: running")
        began = time.monotonic()
        result = compute()
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"settings": settings, "result": result,
                                       "seconds": round(time.monotonic() - began, 1)}) + "\n")
        self.log(f"{key}: done in {time.monotonic() - began:.0f} s")
        return result

    def train(self, key: str, spec, images, labels, *, task: str, defense: str = "none", epochs: int,
              held_out=None, **fit_options):
        """A model of ``spec`` trained by :func:`minrr.backends.defences.fit` (``fit_options`` are
        its keyword arguments), and the fit's per-epoch diagnostics (epochs x DIAGNOSTICS).

        The weights are kept in the work folder; the fit's state is saved after every epoch, so an
        interrupted training resumes at its last finished epoch."""
        import torch

        from minrr.backends.defences import fit
        from minrr.backends.models import build_model

        settings = {"spec": spec.to_dict(), "task": task, "defense": defense, "epochs": epochs,
                    "data": [len(images), _digest({"labels": np.asarray(labels).tolist()})],
                    "seed": self.seed, **{k: v for k, v in fit_options.items() if k != "settings"},
                    "defence_settings": fit_options.get("settings")}
        digest = _digest(settings)
        weights = self.work / f"{key}-{digest}.pt"
        resume_file = self.work / f"{key}-{digest}.resume.pt"
        model = build_model(spec, seed=self.seed)
        if weights.is_file() and not self.fresh:
            saved = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["model"])
            self.log(f"{key}: trained before, loaded from {weights}")
            return model.to(self.backend.device).eval(), saved["diagnostics"].tolist()
        resume = None
        if resume_file.is_file() and not self.fresh:
            resume = torch.load(resume_file, map_location="cpu", weights_only=True)
            self.log(f"{key}: resuming after epoch {int(resume['epoch'])} of {epochs}")
        else:
            self.log(f"{key}: training ({defense}, {epochs} epochs, {len(images)} images)")

        def on_epoch(state, optimizer):
            with atomic_path(resume_file) as tmp:
                torch.save(state.state_dict(model, optimizer), tmp)
            self.log(f"{key}: epoch {state.epoch}/{epochs}, last loss {state.history[-1]:.4f}"
                     if state.history else f"{key}: epoch {state.epoch}/{epochs}")

        state = fit(model, images, labels, task=task, defense=defense, epochs=epochs, seed=self.seed,
                    held_out=held_out, backend=self.backend, resume=resume, on_epoch=on_epoch, **fit_options)
        diagnostics = torch.tensor(state.diagnostics, dtype=torch.float64)
        with atomic_path(weights) as tmp:
            torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        "diagnostics": diagnostics}, tmp)
        resume_file.unlink(missing_ok=True)
        return model.eval(), diagnostics.tolist()

    def array(self, key: str, settings: dict, compute) -> np.ndarray:
        """The NumPy array of ``compute()`` (e.g. attacked images), kept in the work folder as
        ``KEY-DIGEST.npy`` (the digest of ``settings``) and loaded from there when present."""
        path = self.work / f"{key}-{_digest(settings)}.npy"
        if path.is_file() and not self.fresh:
            self.log(f"{key}: finished before, loaded from {path}")
            return np.load(path, allow_pickle=False)
        self.log(f"{key}: running")
        began = time.monotonic()
        result = np.asarray(compute())
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, result, allow_pickle=False)
        self.log(f"{key}: done in {time.monotonic() - began:.0f} s")
        return result

    # ---- results --------------------------------------------------------------------------------
    def write(self, filename: str, text: str) -> Path:
        """Write a results file (table, JSON) into the output folder, atomically."""
        path = self.out / filename
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        self.log(f"wrote {path}")
        return path

    def figure(self, filename: str, fig) -> Path:
        """Save a matplotlib figure as PNG into the output folder, atomically, and close it."""
        import matplotlib.pyplot as plt

        path = self.out / filename
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        self.log(f"wrote {path}")
        return path

    def header(self, title: str, command: str) -> str:
        """The opening lines of a results page: title, the command that regenerates it, the machine."""
        mode = "quick (bundled subset, small sizes)" if self.quick else "full (Fashion-MNIST, 60,000 + 10,000 images)"
        return (f"## {title}\n\nRegenerate: `{command}`\n\nMode: {mode}; seed {self.seed}; device "
                f"{self.backend.device}. Machine: {self.machine}.\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats are written with 3 decimals (or as given when already strings)."""
    def cell(v):
        if isinstance(v, float):
            return "n/a" if not np.isfinite(v) else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
