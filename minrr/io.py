"""Loading and validating user arrays; atomic writes of results.

Every public entry of minrr validates its inputs with these helpers, so a bad
input raises one ``ValueError`` (or ``TypeError``) whose message names the
argument or file and says what was expected. The CLI prints that message as
one line and exits with status 1.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = [
    "load_npy",
    "load_npz",
    "as_float_array",
    "check_probability",
    "check_positive",
    "check_output_path",
    "atomic_path",
]


def load_npy(path, *, name: str, mmap: bool = False) -> np.ndarray:
    """Load a ``.npy`` file without ever unpickling.

    ``name`` is the argument the file came from (``--embeddings``); it starts
    every error message. The header is checked before any data is read:
    object arrays (pickles), archives, and files shorter than their header
    promises are refused. With ``mmap=True`` the array is memory-mapped
    read-only, so large arrays need not fit in memory.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{name}: file not found: {path}")
    with open(path, "rb") as fh:
        start = fh.read(6)
        fh.seek(0)
        if start[:1] == b"\x80":
            raise ValueError(f"{name}: {path} is a pickled Python object; minrr loads only numeric .npy arrays")
        if start[:2] == b"PK":
            raise ValueError(f"{name}: {path} is an .npz archive; expected a single .npy array")
        try:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(fh)
        except ValueError as exc:
            raise ValueError(f"{name}: {path} is not a .npy file ({exc})") from None
        offset = fh.tell()
    if dtype.hasobject:
        raise ValueError(f"{name}: {path} holds Python objects (a pickled array); minrr loads only numeric .npy arrays")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise ValueError(f"{name}: {path} is truncated ({size} bytes, its header promises {expected})")
    return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


def load_npz(path, *, name: str) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` archive into memory, never unpickling."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{name}: file not found: {path}")
    arrays = None
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as archive:
                arrays = {key: archive[key] for key in archive.files}
    except ValueError as exc:
        what = "pickled Python objects" if "allow_pickle" in str(exc) else f"unreadable data ({exc})"
        raise ValueError(f"{name}: {path} holds {what}; expected an .npz archive of numeric arrays") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{name}: {path} is truncated or not an .npz archive ({exc})") from None
    if arrays is None:
        raise ValueError(f"{name}: {path} is a single .npy array; expected an .npz archive")
    return arrays


def check_output_path(path, *, name: str) -> None:
    """Check, before any work starts, that ``path`` can be written: its folder must exist."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise ValueError(f"{name}: the folder of {path} does not exist")


def as_float_array(x, *, name: str, ndim: int | tuple[int, ...], dtype=np.float64) -> np.ndarray:
    """Return ``x`` as a finite real array of the given number of dimensions.

    Integer and boolean inputs are converted; complex, object and string
    arrays are refused, and so are NaN and infinity.
    """
    arr = np.asarray(x)
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if arr.ndim not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(f"{name}: expected a {want} array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name}: array is empty (shape {arr.shape})")
    arr = np.asarray(arr, dtype=dtype)
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name}: contains NaN or infinity (first at index {tuple(int(i) for i in bad)})")
    return arr


def check_probability(value: float, *, name: str) -> float:
    """Check that ``value`` lies strictly inside (0, 1)."""
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name}: expected a number strictly between 0 and 1, got {value:g}")
    return value


def check_positive(value: float, *, name: str) -> float:
    """Check that ``value`` is a finite number above 0."""
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite number above 0, got {value:g}")
    return value


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    If the block raises, the temporary file is removed and ``path`` is left
    untouched, so a failed run never leaves a partial result behind.
    """
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise ValueError(f"{path}: the folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
