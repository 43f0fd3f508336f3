"""Checkpoints: a state_dict saved with ``torch.save`` beside a small JSON model card.

``model.pt`` holds only tensors and is loaded with ``torch.load(...,
weights_only=True)``, so no pickled code ever runs; ``model.json`` (the same
name with ``.json``) says what the tensors are::

    {
      "format": "minrr-model-card/1",
      "weights": {"file": "model.pt", "sha256": "..."},
      "model": {"arch", "in_channels", "head", "dim", "width", "mean", "std", "stem"},
      "embedding": {"head": "embedding" | "hash", "dim": 128, "norm_bound": 1.0},
      "input": {"shape": [C, H, W], "range": [0, 1], "normalisation": "..."},
      "data": {...}, "training": {...}, "metrics": {...}, "software": {...}
    }

``model`` is the :class:`~minrr.backends.models.ModelSpec` that rebuilds the
network; ``weights.sha256`` ties the card to its weights file.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch

import minrr
from minrr.io import atomic_path

from .models import ModelSpec, RetrievalNet, build_model

__all__ = ["CARD_FORMAT", "card_path", "check_weights_path", "save_checkpoint", "read_card", "load_checkpoint"]

CARD_FORMAT = "minrr-model-card/1"


def card_path(path) -> Path:
    """The model card beside a weights file: the same name with ``.json``."""
    return Path(path).with_suffix(".json")


def check_weights_path(path, *, name: str = "out") -> Path:
    """``path`` as a weights file to write: not a .json, in a folder that exists."""
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"{name}: {path} would be the weights file; its model card is the .json beside it")
    if not path.resolve().parent.is_dir():
        raise ValueError(f"{name}: the folder of {path} does not exist")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path, model: RetrievalNet, *, input_shape, data: dict | None = None,
                    training: dict | None = None, metrics: dict | None = None, name: str = "out") -> dict:
    """Write ``path`` (the state_dict) and its model card, each atomically; returns the card.

    input_shape : (C, H, W) of the training images.
    data, training, metrics : free-form JSON-ready sections of the card.
    """
    path = check_weights_path(path, name=name)
    spec = model.spec
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        digest = _sha256(tmp)
    card = {
        "format": CARD_FORMAT,
        "weights": {"file": path.name, "sha256": digest},
        "model": spec.to_dict(),
        "embedding": {"head": spec.head, "dim": spec.dim, "norm_bound": spec.norm_bound},
        "input": {"shape": [int(v) for v in input_shape], "range": [0, 1],
                  "normalisation": "inside the model: (x - mean) / std per channel"},
        "data": data or {},
        "training": training or {},
        "metrics": metrics or {},
        "software": {"minrr": minrr.__version__, "torch": torch.__version__},
    }
    with atomic_path(card_path(path)) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    return card


def read_card(path, *, name: str = "model") -> dict:
    """The model card of the weights file ``path``, checked against it."""
    path = Path(path)
    card_file = card_path(path)
    if not path.is_file():
        raise ValueError(f"{name}: file not found: {path}")
    if not card_file.is_file():
        raise ValueError(f"{name}: the model card {card_file} is missing (minrr train writes it beside the weights)")
    try:
        card = json.loads(card_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name}: {card_file} is not a JSON model card ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ValueError(f"{name}: {card_file} is not a {CARD_FORMAT} model card")
    if card.get("weights", {}).get("sha256") != _sha256(path):
        raise ValueError(f"{name}: {path} does not match its model card {card_file} (SHA-256 differs)")
    return card


def load_checkpoint(path, *, device="cpu", name: str = "model") -> tuple[RetrievalNet, dict]:
    """The model of a checkpoint, in eval mode on ``device``, and its card.

    The weights are read with ``weights_only=True``; missing, extra or
    misshapen tensors raise ValueError.
    """
    card = read_card(path, name=name)
    try:
        spec = ModelSpec.from_dict(card.get("model"))
    except ValueError as exc:
        raise ValueError(f"{name}: bad model card {card_path(path)}: {exc}") from None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{name}: {path} is not a state_dict of tensors ({str(exc).splitlines()[0]})") from None
    model = build_model(spec)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(f"{name}: {path} does not fit its model card ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), card
