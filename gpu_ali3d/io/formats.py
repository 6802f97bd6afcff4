"""Choose the reader or writer of a particle stack or volume from its file name.

| suffix            | stacks                          | volumes           |
| ----------------- | ------------------------------- | ----------------- |
| .hdf .h5 .hdf5    | EMAN2/SPARX HDF (read, write)   | read, write       |
| .star             | RELION 3.0 / 3.1 (read, write)  | -                 |
| .cs               | cryoSPARC (read, write)         | -                 |
| .mrcs .mrc        | bare MRC stack (read: no poses) | .mrc read, write  |
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .stack import ParticleStack

HDF_SUFFIXES = (".hdf", ".h5", ".hdf5")
STACK_SUFFIXES = HDF_SUFFIXES + (".star", ".cs", ".mrcs", ".mrc")
VOLUME_SUFFIXES = HDF_SUFFIXES + (".mrc", ".map")


def stack_format(path: str | os.PathLike) -> str:
    """'hdf', 'star', 'cs' or 'mrcs' from the file name; ValueError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in HDF_SUFFIXES:
        return "hdf"
    if suffix in (".star", ".cs"):
        return suffix[1:]
    if suffix in (".mrcs", ".mrc"):
        return "mrcs"
    raise ValueError(f"{path}: unknown particle stack format {suffix or '(no suffix)'!r}; "
                     f"expected one of {', '.join(STACK_SUFFIXES)}")


def read_stack(path: str | os.PathLike) -> ParticleStack:
    """Read a particle stack (images lazily) in any supported format."""
    fmt = stack_format(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if fmt == "hdf":
        from .eman_hdf import read_hdf_stack
        return read_hdf_stack(path)
    if fmt == "star":
        from .star import read_star
        return read_star(path)
    if fmt == "cs":
        from .cryosparc import read_cs
        return read_cs(path)
    from .mrc import read_mrc_stack
    return read_mrc_stack(path)


def write_stack(stack: ParticleStack, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write a particle stack with poses and CTF. A bare MRC stack cannot hold poses and is refused."""
    fmt = stack_format(path)
    if fmt == "mrcs":
        raise ValueError(f"{path}: an MRC stack cannot hold poses or CTF; write a .star (RELION) or .hdf (EMAN2) "
                         "file, which stores the images and their parameters")
    if fmt == "hdf":
        from .eman_hdf import write_hdf_stack
        write_hdf_stack(stack, path, overwrite=overwrite)
    elif fmt == "star":
        from .star import write_star
        write_star(stack, path, overwrite=overwrite)
    else:
        from .cryosparc import write_cs
        write_cs(stack, path, overwrite=overwrite)


def write_poses(stack: ParticleStack, path: str | os.PathLike) -> None:
    """Write a stack's poses into the file it was read from (``--write-headers``), atomically.

    STAR and .cs files keep everything but the pose columns and the half sets (:func:`star.replace_star_poses`,
    :func:`cryosparc.replace_cs_poses`): their image paths stay as the user's file gives them. An HDF stack, which
    holds its images itself, is written again whole.
    """
    fmt = stack_format(path)
    if fmt == "star":
        from .star import replace_star_poses
        replace_star_poses(stack, path)
    elif fmt == "cs":
        from .cryosparc import replace_cs_poses
        replace_cs_poses(stack, path)
    else:
        write_stack(stack, path, overwrite=True)


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """float32 (z, y, x) volume and its voxel size in Angstrom (None when the file does not say)."""
    suffix = Path(path).suffix.lower()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if suffix in HDF_SUFFIXES:
        from .eman_hdf import read_hdf_volume
        return read_hdf_volume(path)
    if suffix in (".mrc", ".map"):
        from .mrc import read_volume as read_mrc_volume
        return read_mrc_volume(path)
    raise ValueError(f"{path}: unknown volume format {suffix!r}; expected one of {', '.join(VOLUME_SUFFIXES)}")


def write_volume(path: str | os.PathLike, vol: np.ndarray, apix_A: float | None = None, *,
                 overwrite: bool = False) -> None:
    """Write a volume as EMAN2 HDF or MRC, chosen by the suffix, atomically."""
    suffix = Path(path).suffix.lower()
    if suffix in HDF_SUFFIXES:
        from .eman_hdf import write_hdf_volume
        write_hdf_volume(path, vol, apix_A, overwrite=overwrite)
    elif suffix in (".mrc", ".map"):
        from .mrc import write_volume as write_mrc_volume
        write_mrc_volume(path, vol, apix_A, overwrite=overwrite)
    else:
        raise ValueError(f"{path}: unknown volume format {suffix!r}; expected one of {', '.join(VOLUME_SUFFIXES)}")
