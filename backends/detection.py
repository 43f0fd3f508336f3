"""Model outputs for the detectors: f(x) and f(t(x)) for every transform a detector reads.

:func:`detector_outputs` runs a model over images and returns what
:class:`minrr.hashing.detect.Detector` (UMCD) or a :class:`minrr.hashing.detection_baselines.BaselineDetector`
reads: ``f``, and the outputs on each transformed copy under the keys of
:data:`minrr.hashing.detection_baselines.OUTPUT_TRANSFORMS` (``f_t`` for the 3 x 3 mean blur, ``f_median``,
...). The transforms are minrr's NumPy ones (:mod:`minrr.hashing.transforms`), applied on the host a
batch at a time; the forward passes run through the model's backend, in eval mode, on the
device the model's parameters are on. :func:`database_codes` gives C1's database codes
sign(f) of database images.
"""

from __future__ import annotations

import numpy as np

from minrr.data.loaders import check_images, to_unit_float
from minrr.hashing.detect import binarize, check_outputs
from minrr.hashing.detection_baselines import squeeze, transformed_outputs

from minrr.progress import progress_bar

from . import backend_for
from .base import check_whole

__all__ = ["detector_outputs", "database_codes"]


def detector_outputs(model, images, detector: str = "umcd", *, batch_size: int = 256,
                     progress: bool = False) -> dict[str, np.ndarray]:
    """The outputs ``detector`` needs, from the model itself.

    Parameters
    ----------
    model : a torch ``nn.Module`` (run on the device of its parameters) or a NumPy callable,
        mapping (b, C, H, W) images in [0, 1] to (b, K) outputs.
    images : (N, C, H, W) uint8 or floats in [0, 1].
    detector : ``"umcd"`` or one of :data:`minrr.hashing.detection_baselines.DETECTORS`.
    batch_size : images per batch; each batch goes through the model with its transformed
        copies, so a forward pass holds up to (1 + number of transforms) * batch_size images.
        Changes nothing but speed and memory (the model is in eval mode).
    progress : show a progress bar on stderr.

    Returns
    -------
    dict: ``"f"`` (N, K) float64 outputs on the images, and for each key of
    ``transformed_outputs(detector)`` the (N, K) outputs on the transformed copies.
    """
    keys = transformed_outputs(detector)
    images = check_images(images, name="images")
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, C, H, W) images, got shape {images.shape}")
    batch_size = check_whole(batch_size, "batch_size", 1)
    backend = backend_for(model)
    parts = {key: [] for key in ("f", *keys)}
    with progress_bar(len(images), progress, "img") as bar:
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            x = to_unit_float(x) if x.dtype == np.uint8 else x  # floats keep their precision
            stacked = np.concatenate([x, *(squeeze(x, key) for key in keys)])
            out = backend.embed(model, stacked, batch_size=len(stacked)).astype(np.float64, copy=False)
            for i, key in enumerate(parts):
                parts[key].append(out[i * len(x):(i + 1) * len(x)])
            if bar is not None:
                bar.update(len(x))
    return {key: np.concatenate(values) for key, values in parts.items()}


def database_codes(model, images, *, batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """C1's database from images: their codes b = sign(f) (sign(0) = +1) through the hashing model.

    Parameters as :func:`detector_outputs`; the outputs must lie in [-1, 1].

    Returns
    -------
    (N, K) int8 of +-1.
    """
    images = check_images(images, name="images")
    batch_size = check_whole(batch_size, "batch_size", 1)
    backend = backend_for(model)
    return binarize(check_outputs(backend.embed(model, images, batch_size=batch_size, progress=progress),
                                  name="model"))
