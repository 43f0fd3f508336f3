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
import io
import json
import sys
from pathlib import Path

import torch

import minrr
from minrr.io import atomic_paths, read_json

from .models import ModelSpec, RetrievalNet, build_model

__all__ = ["CARD_FORMAT", "card_path", "check_weights_path", "check_card_replaceable", "save_checkpoint", "read_card",
           "load_checkpoint"]

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


def check_card_replaceable(path, *, name: str = "out") -> None:
    """Refuse to replace the existing file ``path`` unless it is a minrr model card.

    Writing ``model.pt`` also writes ``model.json``; an unrelated ``model.json``
    (a detector, a summary) must not be overwritten by it. A card of an
    earlier run may be replaced, as its weights file is.
    """
    try:
        card = read_json(path, name=name)
    except ValueError:
        card = None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ValueError(f"{name}: its model card would replace {path}, which is not a minrr model card; "
                         "choose another weights file name")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path, model: RetrievalNet, *, input_shape, data: dict | None = None,
                    training: dict | None = None, metrics: dict | None = None, name: str = "out") -> dict:
    """Write ``path`` (the state_dict) and its model card, both or neither; returns the card.

    input_shape : (C, H, W) of the training images.
    data, training, metrics : free-form JSON-ready sections of the card.
    """
    path = check_weights_path(path, name=name)
    spec = model.spec
    with atomic_paths(path, card_path(path)) as (weights_tmp, card_tmp):
        buffer = io.BytesIO()  # not the temporary file: torch.save would record its random name in the archive
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
        weights_tmp.write_bytes(buffer.getvalue())
        card = _card(path, spec, _sha256(weights_tmp), input_shape, data, training, metrics)
        card_tmp.write_text(json.dumps(card, indent=2) + "\n")
    return card


def _card(path: Path, spec, digest: str, input_shape, data, training, metrics) -> dict:
    return {
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


def read_card(path, *, name: str = "model") -> dict:
    """The model card of the weights file ``path``, checked against it."""
    path = Path(path)
    card_file = card_path(path)
    if not path.is_file():
        raise ValueError(f"{name}: file not found: {path}")
    if not card_file.is_file():
        raise ValueError(f"{name}: the model card {card_file} is missing (minrr train writes it beside the weights)")
    try:
        card = read_json(card_file, name=name)
    except ValueError as exc:
        raise ValueError(f"{exc}; it is not a JSON model card") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ValueError(f"{name}: {card_file} is not a {CARD_FORMAT} model card")
    _check_card(card, card_file, name)
    if card["weights"]["sha256"] != _sha256(path):
        raise ValueError(f"{name}: {path} does not match its model card {card_file} (SHA-256 differs)")
    return card


def _check_card(card: dict, card_file: Path, name: str) -> None:
    """The entries of a card that minrr reads, present and of the right kind."""
    def entry(section: str, key: str):
        value = card.get(section)
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"{name}: the model card {card_file} lacks {section}.{key}")
        return value[key]

    def bad(what: str, expected: str):
        return ValueError(f"{name}: the model card {card_file} has a bad {what}; expected {expected}")

    if not isinstance(entry("weights", "sha256"), str):
        raise bad("weights.sha256", "a hex string")
    if entry("embedding", "head") not in ("embedding", "hash"):
        raise bad("embedding.head", "'embedding' or 'hash'")
    bound = entry("embedding", "norm_bound")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound <= sys.float_info.max:
        raise bad("embedding.norm_bound", "a finite number above 0")
    shape = entry("input", "shape")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
            and shape[0] * shape[1] * shape[2] <= 1 << 26):
        raise bad("input.shape", "[C, H, W] of whole numbers >= 1, C H W at most 2**26")
    data = card.get("data", {})
    if not isinstance(data, dict) or any(not isinstance(data.get(k), (str, type(None))) for k in ("train", "test")):
        raise bad("data", "an object whose train and test are paths or null")


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
    except Exception as exc:  # a damaged or foreign file: torch raises many kinds
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{name}: {path} is not a state_dict of tensors ({first})") from None
    model = build_model(spec)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(f"{name}: {path} does not fit its model card ({str(exc).splitlines()[0]})") from None
    model = model.to(device).eval()
    shape = card["input"]["shape"]
    try:  # one zero image of the card's input shape: an edited shape fails here, not in the middle of a run
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=next(model.parameters()).device))
    except RuntimeError:
        raise ValueError(f"{name}: the input shape {shape} of its model card {card_path(path)} does not fit "
                         f"its network ({spec.arch}, {spec.in_channels} channels)") from None
    return model, card
