"""Backends for the heavy parts: embedding batches, sampling noisy embeddings, attack and training steps.

Every backend is a :class:`~minrr.backends.base.Backend` with the same four
verbs (``embed``, ``sample_noisy``, ``attack_step``, ``train_step``); see that
module for the contract. Backends are imported lazily by name, so
``import minrr.backends`` never imports a framework:

>>> backend = get_backend("numpy")               # any NumPy callable
>>> backend = get_backend("torch", device="cpu")  # an nn.Module; CUDA by default when present

The type checks below look at ``sys.modules`` first (as einops and
array-api-compat do): an object can only be a torch tensor or module if
torch has already been imported by someone else.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

__all__ = ["BACKENDS", "get_backend", "available_backends", "backend_for", "model_device", "is_torch_tensor",
           "is_torch_module"]

BACKENDS = {"numpy": ("minrr.backends.numpy_backend", "numpy"), "torch": ("minrr.backends.torch_backend", "torch")}
"""Backend name -> (module, framework it needs)."""


def available_backends() -> list[str]:
    """Names of the backends whose framework is installed (without importing it)."""
    return [name for name, (_, framework) in BACKENDS.items() if importlib.util.find_spec(framework) is not None]


def get_backend(name: str, **options):
    """The backend called ``name`` ("numpy" or "torch"), built with ``options``.

    The torch backend takes ``device`` ("cuda" when available, else "cpu")
    and ``dtype`` ("float32"); the numpy backend takes no options.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    module_name, framework = BACKENDS[name]
    if importlib.util.find_spec(framework) is None:
        raise ValueError(f"backend: {name!r} needs {framework}, which is not installed "
                         f"(pip install 'minrr[{framework}]')")
    backend_class = importlib.import_module(module_name).BACKEND_CLASS
    try:
        return backend_class(**options)
    except TypeError as exc:
        raise TypeError(f"options: the {name} backend {str(exc).split('() ', 1)[-1]}") from None


def is_torch_tensor(x) -> bool:
    """True if ``x`` is a ``torch.Tensor``; never imports torch."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_torch_module(x) -> bool:
    """True if ``x`` is a ``torch.nn.Module``; never imports torch."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.nn.Module)


def model_device(model):
    """The device of a torch module's first parameter or buffer; None (the default) otherwise."""
    if not is_torch_module(model):
        return None
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def backend_for(model, *, device=None):
    """The backend that runs ``model``: torch for an ``nn.Module``, numpy for any other callable.

    The torch backend runs on ``device``; None: the device the model's weights are on (so a
    library call never moves a caller's model), or the default device for a module without any.
    """
    if is_torch_module(model):
        return get_backend("torch", device=model_device(model) if device is None else device)
    if not callable(model):
        raise TypeError(f"model: expected a torch nn.Module or a NumPy callable, got {type(model).__name__}")
    return get_backend("numpy")
