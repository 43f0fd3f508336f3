"""How a command writes its outputs: never over an input, checked first, all or nothing.

A command lists the files it reads and the files it will write, checks them
all before any work starts, and writes its outputs together at the end::

    from minrr.cli.outputs import Files

    files = Files.of(args, inputs=["--database", "--queries"], outputs=["--out", "--json"])
    files.check()                                        # before any work
    ...                                                  # the work
    with files.commit() as tmp:                          # temporary files beside the targets
        np.savez(tmp["--out"], ...)
        tmp["--json"].write_text(...)
    # renamed onto --out and --json only here, and only if the block succeeded

Flags not given (``None``) are skipped. ``files.input(flag, path)`` and
``files.output(flag, path, beside={...})`` register one file at a time, e.g.
the model card that ``minrr train`` writes beside ``--out``.

:meth:`Files.check` refuses, with one line naming both flags, an output that is
the same file as an input, as another output, or as a file written beside an
output (``beside=``, e.g. the model card beside ``model.pt`` or
``results.tsv.partial``): same path, ``..`` segments, symbolic links and hard
links included. It also refuses an output location that cannot be written: a
missing or unwritable folder, a folder where a file is wanted, a dangling
symbolic link, or something that is not a regular file (``/dev/null``).
:meth:`Files.commit` is :func:`minrr.io.atomic_paths`: a failure leaves none
of the outputs, and outputs get the permissions of the user's umask.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["Files", "same_file"]


def _normal(path: Path) -> Path:
    """An absolute path with symbolic links of its folder resolved (the file itself may not exist)."""
    return path.absolute().parent.resolve() / path.name


def same_file(a, b) -> bool:
    """Whether the paths ``a`` and ``b`` name the same file (existing or not)."""
    a, b = Path(a), Path(b)
    with contextlib.suppress(OSError):
        if os.path.samefile(a, b):  # both exist: same inode (hard links, symbolic links)
            return True
    return a.resolve() == b.resolve() or _normal(a) == _normal(b)


class Files:
    """The input and output files of one command run (see the module docstring).

    Each path is registered under the flag that gave it; ``None`` is skipped,
    so optional flags need no ``if``.
    """

    def __init__(self):
        self._inputs: list[tuple[str, Path]] = []
        self._outputs: list[tuple[str, Path]] = []
        self._beside: list[tuple[str, str, Path]] = []  # (flag of the output, what it is, path)
        self._replaceable: list[tuple[Path, Callable[[Path], None]]] = []

    @classmethod
    def of(cls, args, *, inputs=(), outputs=()) -> Files:
        """The files named by the flags ``inputs`` and ``outputs`` of the parsed ``args``
        (``"--gallery-labels"`` reads ``args.gallery_labels``)."""
        files = cls()
        for flag in inputs:
            files.input(flag, getattr(args, _dest(flag)))
        for flag in outputs:
            files.output(flag, getattr(args, _dest(flag)))
        return files

    def input(self, flag: str, path) -> None:
        """A file the command reads."""
        if path is not None:
            self._inputs.append((flag, Path(path)))

    def output(self, flag: str, path, *, beside: dict | None = None,
               replaceable: Callable[[Path], None] | None = None) -> None:
        """A file the command writes, and the files it writes beside it.

        beside : ``{description: path}``, e.g. ``{"model card": Path("model.json")}``.
        replaceable : called with each existing ``beside`` file before any work; it
            raises ValueError when that file must not be replaced (e.g. a .json
            that is not a minrr model card).
        """
        if path is None:
            return
        if str(path).endswith(("/", os.sep)):  # Path() would drop the slash
            raise ValueError(f"{flag}: {path} names a folder; expected a file path")
        self._outputs.append((flag, Path(path)))
        for what, side in (beside or {}).items():
            self._beside.append((flag, what, Path(side)))
            if replaceable is not None:
                self._replaceable.append((Path(side), replaceable))

    def check(self) -> None:
        """Refuse, with ValueError, any output that would replace an input or another output,
        or that cannot be written."""
        written = []  # (flag, path, what it is): each output, then the files written beside it
        for flag, path in self._outputs:
            written.append((flag, path, flag))
            written += [(flag, side, f"the {what} written beside {flag}")
                        for of, what, side in self._beside if of == flag]
        for flag, path, _ in written:
            _check_writable(flag, path)
        for i, (flag, path, _) in enumerate(written):
            for other_flag, other in self._inputs:
                if same_file(path, other):
                    raise ValueError(f"{flag}: {path} is the input file of {other_flag}; "
                                     "choose another output path")
            for _, other, what in written[:i]:
                if same_file(path, other):
                    raise ValueError(f"{flag}: {path} is also {what}; give each output its own path")
        for path, replaceable in self._replaceable:
            if path.exists():
                replaceable(path)

    @contextlib.contextmanager
    def commit(self):
        """Yield ``{flag: temporary path}`` for every output; the files are renamed onto their
        targets when the block succeeds, and removed otherwise (:func:`minrr.io.atomic_paths`)."""
        from minrr.io import atomic_paths

        flags = [flag for flag, _ in self._outputs]
        try:
            with atomic_paths(*(path for _, path in self._outputs)) as temporaries:
                yield dict(zip(flags, temporaries))
        except OSError as exc:
            if exc.filename is not None or exc.errno is None:
                raise
            # e.g. a full disk while writing through a file object: name the outputs being written
            raise OSError(exc.errno, exc.strerror, ", ".join(flags)) from None


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _check_writable(flag: str, path: Path) -> None:
    """``path`` can be created or replaced as a regular file, or ValueError naming ``flag``."""
    if path.is_dir():
        raise ValueError(f"{flag}: {path} is a folder; expected a file path")
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{flag}: {path} is a symbolic link to a missing file ({os.readlink(path)})")
    if path.exists() and not path.is_file():
        raise ValueError(f"{flag}: {path} exists and is not a regular file")
    folder = path.absolute().parent
    if not folder.is_dir():
        raise ValueError(f"{flag}: the folder of {path} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot write to the folder {folder} (permission denied)")
