"""Real data: the bundled Fashion-MNIST subset and a reader for IDX files.

The subset (5,000 training and 1,000 test images, balanced over the 10
classes) ships inside the package with its licence, ``LICENSE-fashion-mnist``.
The full data set is the Debian package ``dataset-fashion-mnist``
(:data:`DEBIAN_FASHION_MNIST`), readable with :func:`read_idx`.
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["DEBIAN_FASHION_MNIST", "FASHION_MNIST_CLASSES", "fashion_mnist_subset", "read_idx"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def fashion_mnist_subset() -> dict[str, np.ndarray]:
    """The bundled subset: ``train_images`` (5000, 28, 28) uint8, ``train_labels`` (5000,),
    ``test_images`` (1000, 28, 28), ``test_labels`` (1000,), and each image's index
    in the original files (``train_index``, ``test_index``)."""
    with resources.files(__package__).joinpath("fashion_mnist_subset.npz").open("rb") as fh:
        with np.load(fh, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: truncated or padded IDX file ({len(data)} bytes, expected {expected})")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
