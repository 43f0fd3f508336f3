"""Loading and validating user arrays; atomic writes of results.

Every public entry of minrr validates its inputs with these helpers, so a bad
input raises one ``ValueError`` (or ``TypeError``) whose message names the
argument or file and says what was expected. The CLI prints that message as
one line and exits with status 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import zipfile
from pathlib import Path

import numpy as np

__all__ = [
    "load_npy",
    "load_npz",
    "shard_paths",
    "rows_shape",
    "load_rows_file",
    "as_float_array",
    "check_probability",
    "check_positive",
    "check_output_path",
    "read_json",
    "json_fingerprint",
    "check_json_fingerprint",
    "MAX_JSON_BYTES",
    "atomic_path",
    "atomic_paths",
]

MAX_JSON_BYTES = 64 << 20
"""Largest JSON file minrr reads (model cards, detectors, attack records): 64 MiB."""


def load_npy(path, *, name: str, mmap: bool = False) -> np.ndarray:
    """Load a ``.npy`` file without ever unpickling.

    ``name`` is the argument the file came from (``--embeddings``); it starts
    every error message. The header is checked before any data is read:
    object arrays (pickles), archives, and files shorter than their header
    promises are refused. With ``mmap=True`` the array is memory-mapped
    read-only, so large arrays need not fit in memory.
    """
    path = _existing_file(path, name)
    with open(path, "rb") as fh:
        start = fh.read(6)
        fh.seek(0)
        if start[:1] == b"\x80":
            raise ValueError(f"{name}: {path} is a pickled Python object; minrr loads only numeric .npy arrays")
        if start[:2] == b"PK":
            raise ValueError(f"{name}: {path} is an .npz archive; expected a single .npy array")
        _check_npy_header(fh, path.stat().st_size, f"{name}: {path}")
    return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


def shard_paths(folder, *, name: str) -> list[Path]:
    """The ``.npy`` shards of a folder, in the order of their file names (their rows' order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{name}: {folder} is not a folder of .npy shards")
    shards = sorted(p for p in folder.iterdir() if p.suffix == ".npy" and p.is_file())
    if not shards:
        raise ValueError(f"{name}: {folder} holds no .npy shard")
    return shards


def _shards(path, name: str) -> list[np.ndarray]:
    """Memory-mapped parts of ``path``: the file, or a folder's shards (checked to stack along rows)."""
    if not Path(path).is_dir():
        return [load_npy(path, name=name, mmap=True)]
    parts = [load_npy(p, name=f"{name}: shard {p.name}", mmap=True) for p in shard_paths(path, name=name)]
    first = parts[0]
    for p, part in zip(shard_paths(path, name=name), parts):
        if part.ndim == 0 or part.shape[1:] != first.shape[1:] or part.dtype != first.dtype:
            raise ValueError(f"{name}: shard {p.name} holds {part.dtype} rows of shape {part.shape[1:]}; the first "
                             f"shard holds {first.dtype} rows of shape {first.shape[1:]}")
    return parts


def rows_shape(path, *, name: str) -> tuple[int, ...]:
    """Shape of a ``.npy`` file, or of the rows of a folder's ``.npy`` shards stacked (headers only)."""
    parts = _shards(path, name)
    return (sum(len(part) for part in parts), *parts[0].shape[1:]) if parts[0].ndim else parts[0].shape


def load_rows_file(path, *, name: str) -> np.ndarray:
    """A ``.npy`` file, or the ``.npy`` shards of a folder stacked along rows in file-name order
    (``part-00000.npy``, ``part-00001.npy``, ...): every shard of one dtype and row shape."""
    parts = _shards(path, name)
    return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)


def _check_npy_header(fh, size: int, where: str) -> None:
    """Read the .npy header at the start of ``fh`` (``size`` bytes in all) and refuse, before any
    data is read, object arrays (pickles), negative sizes and data shorter than the header promises
    (so an absurd shape never reaches an allocation). ``where`` starts every message."""
    try:
        version = np.lib.format.read_magic(fh)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(fh)
    except ValueError as exc:
        raise ValueError(f"{where} is not a .npy file ({exc})") from None
    if dtype.hasobject:
        raise ValueError(f"{where} holds pickled Python objects (an object array); minrr loads only numeric arrays")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{where} has a damaged header (shape {shape}); expected non-negative sizes")
    expected = fh.tell() + math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if size < expected:
        raise ValueError(f"{where} is truncated ({size} bytes, its header promises {expected})")


def _existing_file(path, name: str) -> Path:
    """``path`` as a Path, if it is a regular file (not a folder, a device or a pipe)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{name}: file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{name}: {path} is {'a folder' if path.is_dir() else 'not a regular file'}; expected a file")
    return path


def load_npz(path, *, name: str) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` archive into memory, never unpickling."""
    path = _existing_file(path, name)
    if zipfile.is_zipfile(path):  # every member's header is checked before any data is read
        try:
            with zipfile.ZipFile(path) as archive:
                for member in archive.infolist():
                    if member.filename.endswith(".npy"):
                        with archive.open(member) as fh:
                            _check_npy_header(fh, member.file_size, f"{name}: {path} array {member.filename[:-4]!r}")
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{name}: {path} is truncated or not an .npz archive ({exc})") from None
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


def read_json(path, *, name: str | None = None, max_bytes: int = MAX_JSON_BYTES):
    """The JSON document in the file ``path``, read with a size limit.

    At most ``max_bytes`` are read, so ``/dev/zero`` or a huge file fails at
    once; invalid UTF-8, invalid JSON and nesting too deep for the parser
    raise ``ValueError`` starting with ``name`` (the flag or argument) and the
    file, or with the file alone when ``name`` is None.
    """
    path = Path(path)
    where = f"{name}: {path}" if name else str(path)
    if path.is_dir():
        raise ValueError(f"{where}: is a folder; expected a JSON file")
    if not path.exists():
        raise ValueError(f"{where}: file not found")
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{where}: larger than {max_bytes >> 20} MiB; not a JSON file minrr reads")
    return parse_json(data, name=where)


def parse_json(text, *, name: str):
    """The JSON document in ``text`` (str, or UTF-8 bytes); invalid UTF-8, invalid JSON and
    nesting too deep for the parser raise ``ValueError`` starting with ``name``."""
    try:
        return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise ValueError(f"{name}: JSON nested too deeply") from None


def check_document(document, *, name: str, format: str, version: int) -> None:
    """Refuse anything but a JSON object whose ``format`` and ``version`` are the given ones."""
    if not isinstance(document, dict) or document.get("format") != format:
        raise ValueError(f"{name}: not a {format} JSON document")
    if document.get("version") != version:
        raise ValueError(f"{name}: version {document.get('version')!r}, this minrr reads version {version}")


def json_fingerprint(document: dict) -> str:
    """SHA-256 of a JSON document's canonical text (sorted keys, no spaces), its ``fingerprint`` key left out.

    A file that stores it (``{..., "fingerprint": json_fingerprint(doc)}``) is refused as a
    whole after any edit by :func:`check_json_fingerprint`: it guards against hand edits and
    damage, not against someone who recomputes it.
    """
    body = {key: value for key, value in document.items() if key != "fingerprint"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_json_fingerprint(document: dict, *, name: str) -> None:
    """Refuse a document whose ``fingerprint`` is missing or does not match its content."""
    if document.get("fingerprint") != json_fingerprint(document):
        what = "has no fingerprint" if "fingerprint" not in document else "does not match its fingerprint"
        raise ValueError(f"{name}: the file {what}; it was edited or damaged since minrr wrote it (write it again)")


def _temporary_beside(path: Path) -> Path:
    """Create an empty hidden file beside ``path``, with the permissions of the user's umask.

    ``tempfile.mkstemp`` would make it 0600; ``os.open(..., 0o666)`` lets the
    umask decide, as for any file the user creates. The suffix of ``path`` is
    kept, so writers that pick a format from it (matplotlib) still do.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_paths(*paths):
    """Yield temporary paths beside ``paths``; rename them all onto ``paths`` on success.

    All or nothing: if the block raises, every temporary file is removed and
    no path is touched; if a rename fails (rare: the checks come first), the
    outputs already renamed by this call are removed too. Files get the
    permissions of the user's umask.

    Example::

        with atomic_paths("results.tsv", "summary.json") as (tsv, summary):
            tsv.write_text(...)
            summary.write_text(...)
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.resolve().parent.is_dir():
            raise ValueError(f"{path}: the folder {path.parent} does not exist")
    temporaries: list[Path] = []
    try:
        for path in paths:
            temporaries.append(_temporary_beside(path))
        yield temporaries
        renamed = []
        try:
            for tmp, path in zip(temporaries, paths):
                os.replace(tmp, path)
                renamed.append(path)
        except BaseException:
            for path in renamed:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
    finally:
        for tmp in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    If the block raises, the temporary file is removed and ``path`` is left
    untouched, so a failed run never leaves a partial result behind. The file
    gets the permissions of the user's umask. See :func:`atomic_paths`.
    """
    with atomic_paths(path) as (tmp,):
        yield tmp
