"""Atomic file output: a file appears complete under its final name, or not at all."""
from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def refuse_existing(path: str | os.PathLike) -> Path:
    """Return ``Path(path)``; raise FileExistsError if something is there already (outputs never overwrite)."""
    p = Path(path)
    if p.exists():
        raise FileExistsError(f"{p}: output already exists; remove it or choose another name")
    return p


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it.

    The temporary name starts with '.' and ends with the final suffix (so libraries that look at the extension
    behave), in the same directory (so the rename is atomic). With ``overwrite=False`` an existing ``path`` is an
    error raised before anything is written.
    """
    final = Path(path)
    if not overwrite:
        refuse_existing(final)
    if not final.parent.is_dir():
        raise FileNotFoundError(f"{final}: directory {final.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=final.suffix or ".tmp", dir=final.parent)
    except OSError as exc:                         # a read-only folder, a full disk: name the output, not the temporary
        raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from None
    os.close(fd)
    os.unlink(tmp)  # writers create the file themselves (h5py, mrcfile refuse some existing files)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not overwrite and final.exists():
            raise FileExistsError(f"{final}: appeared while writing; not overwritten")
        os.replace(tmp_path, final)
    except (OSError, RuntimeError) as exc:
        # a failed write (a full disk: write() names no file) or one that names the hidden temporary: name the output
        code = _errno(exc, tmp_path)
        if code is not None:
            raise OSError(code, os.strerror(code), str(final)) from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _errno(exc: BaseException, tmp: Path) -> int | None:
    """The errno of a failed write into ``tmp``: an OSError's own (when it names no file, or tmp), or the one HDF5
    puts in its message ('... filename = TMP, ... errno = 28, ...', raised by h5py as RuntimeError or OSError)."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, str(tmp), tmp):
        return exc.errno
    found = re.search(r"errno = (\d+)", str(exc))
    if found and str(tmp) in str(exc):
        return int(found.group(1))
    return None
