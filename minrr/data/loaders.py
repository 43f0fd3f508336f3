"""Image data sets from files: IDX, image folders (Pillow), NumPy arrays, and the bundled subset.

An :class:`ImageDataset` holds images as ``(N, C, H, W)`` arrays, channels
first: uint8 as stored (0..255), or float32 in [0, 1] for float sources. Pixel
inputs of every model are floats in [0, 1] (:func:`to_unit_float` converts a
batch at a time, so a uint8 data set stays four times smaller in memory);
normalisation happens inside the model.

:func:`load_dataset` reads a *source*:

==================================  ===========================================================
source                              what is read
==================================  ===========================================================
``bundled:train``, ``bundled:test``  the Fashion-MNIST subset shipped in the package
``fashion-mnist:train`` / ``:test``  the full Fashion-MNIST of the Debian package
                                     ``dataset-fashion-mnist``
a folder                             one sub-folder of images per class (sorted names give the
                                     labels 0, 1, ...), read with Pillow
``images.npz``                       arrays ``images`` and ``labels``; or the ``adv.npz`` of
                                     ``minrr attack``: its adversarial images ``x_adv`` and the
                                     labels of their originals
``images.npy`` + labels              an image array; labels from a ``.npy`` or IDX file
an IDX file (``.gz`` or not)         images; labels default to the file named like it with
                                     ``labels-idx1`` in place of ``images-idx3``
==================================  ===========================================================
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import load_npy, load_npz
from . import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, fashion_mnist_subset, read_idx

__all__ = ["ImageDataset", "load_dataset", "load_image_folder", "dataset_from_arrays", "check_images",
           "to_unit_float"]

SPLITS = ("train", "test")
_DEBIAN_FILES = {"train": "train", "test": "t10k"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass(frozen=True)
class ImageDataset:
    """Labelled images.

    images : (N, C, H, W) uint8, or float32 in [0, 1].
    labels : (N,) int64.
    source : where the data came from (a source string of :func:`load_dataset`).
    classes : names of the labels 0, 1, ... when known.
    """

    images: np.ndarray
    labels: np.ndarray
    source: str
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the images and labels: equal fingerprints mean equal data."""
        digest = hashlib.sha256()
        for arr in (self.images, self.labels):
            digest.update(f"{arr.dtype.str}{arr.shape}".encode())
            digest.update(np.ascontiguousarray(arr).data)
        return digest.hexdigest()


def check_images(images, *, name: str = "images") -> np.ndarray:
    """Validate ``(N, ...)`` pixel arrays: uint8, or finite floats in [0, 1]."""
    x = np.asarray(images)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, ...) array of images, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: expected uint8 pixels or floats in [0, 1], got dtype {x.dtype}")
    low, high = float(np.min(x)), float(np.max(x))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{name}: contains NaN or infinity")
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{name}: pixel values must lie in [0, 1] (found {low:g} to {high:g}); "
                         "normalisation belongs inside the model")
    return x


def to_unit_float(images: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Pixels as floats in [0, 1]: uint8 is divided by 255, floats are cast."""
    if images.dtype == np.uint8:
        out = images.astype(dtype)
        out /= 255.0
        return out
    return images.astype(dtype, copy=False)


def dataset_from_arrays(images, labels, *, source: str, classes=None, name: str = "data",
                        labels_name: str = "labels") -> ImageDataset:
    """Check and wrap arrays: images (N, H, W) or (N, C, H, W), labels (N,) integers."""
    x = check_images(images, name=name)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise ValueError(f"{name}: expected (N, H, W) or channels-first (N, C, H, W) images, got shape "
                         f"{x.shape} (channels-last arrays: np.moveaxis(a, -1, 1))")
    if x.dtype.kind == "f":
        x = x.astype(np.float32, copy=False)
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"{labels_name}: expected (N,) integer labels, got shape {y.shape} and dtype {y.dtype}")
    if len(y) != len(x):
        raise ValueError(f"{labels_name}: {len(y)} labels for {len(x)} images; the counts must match")
    return ImageDataset(np.ascontiguousarray(x), y.astype(np.int64), source,
                        None if classes is None else tuple(classes))


def _to_array(image: Image.Image, channels: int | None, size) -> np.ndarray:
    """(C, H, W) uint8 pixels of a Pillow image, converted to L (C = 1) or RGB (C = 3)."""
    gray = image.mode in _GRAY_MODES if channels is None else channels == 1
    image = image.convert("L" if gray else "RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(image, dtype=np.uint8)
    return arr[None] if gray else arr.transpose(2, 0, 1)


def load_image_folder(root, *, channels: int | None = None, size=None, name: str = "data") -> ImageDataset:
    """Images in ``root/<class>/<file>``; sorted class names give the labels 0, 1, ...

    Parameters
    ----------
    root : folder with one sub-folder per class (hidden entries are skipped).
    channels : 1 (grayscale) or 3 (RGB); default 1 if every image is
        grayscale, else 3.
    size : (H, W) to resize every image to (bilinear); default: all images
        must have the same size.

    Returns
    -------
    ImageDataset with (N, C, H, W) uint8 images.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{name}: {root} is not a folder")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
    if size is not None:
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size: expected (H, W) with positive sides, got {size}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{name}: {root} holds no class sub-folders (expected one folder of images per class)")
    arrays, labels = [], []
    for label, folder in enumerate(class_dirs):
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"{name}: the class folder {folder} holds no images")
        for path in files:
            try:
                with Image.open(path) as image:
                    arrays.append(_to_array(image, channels, size))
            except (OSError, Image.DecompressionBombError) as exc:
                raise ValueError(f"{name}: {path} is not an image Pillow can read ({exc})") from None
            labels.append(label)
    if channels is None and any(a.shape[0] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        first, other = sorted(shapes)[:2]
        raise ValueError(f"{name}: images differ in size ({first[0]}x{first[1]} and {other[0]}x{other[1]}); "
                         "give a size to resize them to")
    return ImageDataset(np.stack(arrays), np.asarray(labels, dtype=np.int64), str(root),
                        tuple(d.name for d in class_dirs))


def _split(source: str, name: str) -> str:
    split = source.partition(":")[2] or "train"
    if split not in SPLITS:
        raise ValueError(f"{name}: unknown split {split!r} in {source!r}; expected one of {', '.join(SPLITS)}")
    return split


def _read_idx(path, name: str) -> np.ndarray:
    try:
        return read_idx(path)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _labels_file(path, labels_name: str) -> np.ndarray:
    path = Path(path)
    if path.suffix == ".npy":
        return load_npy(path, name=labels_name)
    return _read_idx(path, labels_name)


def load_dataset(source, labels=None, *, size=None, name: str = "data", labels_name: str = "labels") -> ImageDataset:
    """Read the data set named by ``source`` (see the module docstring).

    ``labels`` is a ``.npy`` or IDX file of (N,) integer labels for an image
    array or IDX source. ``size`` (H, W) resizes the images of a folder. Error
    messages start with ``name`` (the data) or ``labels_name`` (the labels).
    """
    source = str(source)
    kind = source.partition(":")[0]
    path = Path(source)
    builtin = kind in ("bundled", "fashion-mnist") and not path.exists()
    if labels is not None and (builtin or path.is_dir() or path.suffix == ".npz"):
        raise ValueError(f"{labels_name}: the labels of {source} come with it; give labels only for "
                         ".npy or IDX images")
    if builtin:
        split = _split(source, name)
        if kind == "bundled":
            subset = fashion_mnist_subset()
            images, y = subset[f"{split}_images"], subset[f"{split}_labels"]
        else:
            stem = DEBIAN_FASHION_MNIST / _DEBIAN_FILES[split]
            if not DEBIAN_FASHION_MNIST.is_dir():
                raise ValueError(f"{name}: the full Fashion-MNIST is the Debian package dataset-fashion-mnist, "
                                 f"not installed here ({DEBIAN_FASHION_MNIST} is missing); "
                                 "bundled:train and bundled:test are a subset that ships with minrr")
            images = _read_idx(f"{stem}-images-idx3-ubyte.gz", name)
            y = _read_idx(f"{stem}-labels-idx1-ubyte.gz", name)
        return dataset_from_arrays(images, y, source=f"{kind}:{split}", classes=FASHION_MNIST_CLASSES, name=name)
    if path.is_dir():
        return load_image_folder(path, size=size, name=name)
    if not path.is_file():
        raise ValueError(f"{name}: {source} is neither a file, a folder, nor one of bundled:train, "
                         "bundled:test, fashion-mnist:train, fashion-mnist:test")
    if path.suffix == ".npz":
        arrays = load_npz(path, name=name)
        images = "x_adv" if "images" not in arrays and "x_adv" in arrays else "images"  # minrr attack's adv.npz
        missing = {images, "labels"} - set(arrays)
        if missing:
            raise ValueError(f"{name}: {path} lacks the array(s) {', '.join(sorted(missing))}; "
                             "expected 'images' and 'labels' (or the 'x_adv' and 'labels' of minrr attack)")
        return dataset_from_arrays(arrays[images], arrays["labels"], source=source, name=name,
                                   labels_name=name)
    if path.suffix == ".npy":
        if labels is None:
            raise ValueError(f"{labels_name}: required with the image array {source}")
        images = load_npy(path, name=name)
    else:
        images = _read_idx(path, name)
        if labels is None:
            guess = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
            if guess == path or not guess.is_file():
                raise ValueError(f"{labels_name}: required with {source} (no matching labels-idx1 file beside it)")
            labels = guess
    return dataset_from_arrays(images, _labels_file(labels, labels_name), source=source, name=name,
                               labels_name=labels_name)
