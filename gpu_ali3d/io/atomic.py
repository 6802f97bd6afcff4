"""Atomic file output: a file appears complete under its final name, or not at all."""
from __future__ import annotations

import os
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
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=final.suffix or ".tmp", dir=final.parent)
    os.close(fd)
    os.unlink(tmp)  # writers create the file themselves (h5py, mrcfile refuse some existing files)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not overwrite and final.exists():
            raise FileExistsError(f"{final}: appeared while writing; not overwritten")
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
