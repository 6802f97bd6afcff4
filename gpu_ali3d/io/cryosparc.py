"""cryoSPARC particle files (.cs, a numpy structured array) <-> ParticleStack, images in MRC stacks.

Fields used (formats.md): ``blob/path`` (bytes; a leading '>' marks a path inside the cryoSPARC project and is
dropped), ``blob/idx`` (0-based), ``blob/shape``, ``blob/psize_A``, ``alignments3D/pose`` (rotation vector,
radians) and ``alignments3D/shift`` (pixels) through :func:`geometry.spider_from_cryosparc`, and the ``ctf/*``
fields. ``alignments3D/split`` (0/1) becomes ``meta["rlnRandomSubset"]`` (1/2), ``alignments3D/class`` (0-based)
``meta["rlnClassNumber"]`` (1-based) and ``uid`` ``meta["uid"]``;
other fields are not kept. ``blob/sign`` is not applied (the pixels are used as stored, as for RELION stacks).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..ctf import from_relion
from ..geometry import cryosparc_from_spider, spider_from_cryosparc
from .atomic import atomic_path, refuse_existing
from .mrc import MrcStackImages, find_image_files, mrc_voxel_size, plan_image_refs, write_with_images
from .stack import ParticleStack

_POSE_FIELDS = ("alignments3D/pose", "alignments3D/shift")
_CTF_FIELDS = ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast")


def read_cs(path: str | os.PathLike, *, project_dir: str | os.PathLike | None = None) -> ParticleStack:
    """A cryoSPARC particle .cs file -> ParticleStack with lazily read MRC images.

    ``blob/path`` is relative to ``project_dir`` when given; otherwise it is looked up relative to the current
    directory (where the .cs files gpu-ali3d writes have it, as RELION reads image paths), beside the .cs file, and
    in the directory above it (a .cs file exported by cryoSPARC sits in ``<project>/J<n>/``, its paths relative to
    ``<project>``); two of those holding different files is an error naming both.
    image_refs are ``"index@path"`` (1-based) with the path as the file gives it (without the '>').
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: cryoSPARC .cs file not found")
    try:
        cs = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a non-.npy file
        raise ValueError(f"{path}: not a cryoSPARC .cs file (a numpy structured array): {exc}") from None
    if not isinstance(cs, np.ndarray) or cs.dtype.names is None or cs.ndim != 1:
        raise ValueError(f"{path}: not a cryoSPARC .cs file (expected a 1-D numpy structured array)")
    names = set(cs.dtype.names)
    missing = [f for f in ("blob/path", "blob/idx") if f not in names]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} field(s): not a particle .cs file with images")
    missing = [f for f in _POSE_FIELDS if f not in names]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} field(s): local refinement needs starting poses; export "
                         "the particles of a cryoSPARC 3D refinement (homogeneous or non-uniform), not of extraction "
                         "or 2D classification")
    if len(cs) == 0:
        raise ValueError(f"{path}: no particles")

    files = [_decode(p) for p in cs["blob/path"]]
    index = np.asarray(cs["blob/idx"], dtype=np.int64)
    resolved = _resolve_files(path, sorted(set(files)), project_dir)
    images = MrcStackImages([(resolved[f], int(i)) for f, i in zip(files, index)], str(path))
    if "blob/shape" in names:
        shape = np.asarray(cs["blob/shape"]).reshape(len(cs), -1)
        if np.any(shape != images.box):
            raise ValueError(f"{path}: blob/shape {shape[np.any(shape != images.box, axis=1)][0].tolist()} does not "
                             f"match the {images.box}-pixel images in the MRC files")

    apix = _pixel_size(path, cs, images)
    poses = spider_from_cryosparc(np.asarray(cs["alignments3D/pose"], dtype=np.float64),
                                  np.asarray(cs["alignments3D/shift"], dtype=np.float64))
    ctf = _ctf(path, cs)
    meta: dict[str, np.ndarray] = {}
    if "uid" in names:
        meta["uid"] = np.asarray(cs["uid"])
    if "alignments3D/class" in names:  # 0-based in cryoSPARC, RELION's rlnClassNumber counts from 1
        meta["rlnClassNumber"] = np.asarray(cs["alignments3D/class"], dtype=np.int64) + 1
    if "alignments3D/split" in names:
        split = np.asarray(cs["alignments3D/split"], dtype=np.int64)
        if np.all((split == 0) | (split == 1)):
            meta["rlnRandomSubset"] = split + 1
    refs = [f"{i + 1:06d}@{f}" for f, i in zip(files, index)]
    try:
        return ParticleStack(images=images, poses=poses, apix_A=apix, ctf=ctf, image_refs=refs, meta=meta)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_cs(stack: ParticleStack, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a ParticleStack as a cryoSPARC-style .cs file (poses, shifts, CTF, image locations).

    Images read from MRC files are referenced; others are written to ``<stem>.mrcs`` beside it. ``blob/path`` is
    written as RELION reads image paths, relative to the current directory (absolute for files outside it;
    :func:`mrc.image_path_for_metadata`), so a cryoSPARC-to-STAR conversion of the file, used from the folder
    gpu-ali3d ran in, finds the images. All or nothing; existing outputs are refused unless ``overwrite``.
    Fields are stored with cryoSPARC's names and types (float32 poses: about 1e-5 degrees of rounding), one class:
    ``alignments3D/class`` 0 (or ``rlnClassNumber`` - 1, uint32) and ``alignments3D/class_posterior`` 1.0
    (float32), as a cryoSPARC refinement's .cs has them: cryoSPARC-to-STAR converters take the poses by class.
    """
    path = Path(path)
    if not overwrite:
        refuse_existing(path)
    mrcs_path, files, index = plan_image_refs(stack, path, kind=".cs", overwrite=overwrite)
    table = _table(stack, files, index)
    write_with_images(path, mrcs_path, stack, lambda tmp: _save(table, tmp), overwrite=overwrite)
    return path


def replace_cs_poses(stack: ParticleStack, path: str | os.PathLike) -> Path:
    """Write ``stack``'s poses into the .cs file it was read from (``--write-headers``), everything else as it was.

    Only ``alignments3D/pose``, ``alignments3D/shift`` and ``alignments3D/split`` (from ``stack.meta``'s
    rlnRandomSubset, the half sets a refinement used; added when the file has none) change; ``blob/path`` and every
    other field keep the file's bytes. The file must still hold the particles the stack was read from (as many, with
    the same blob/path and blob/idx in the same order): ValueError otherwise. Replaced atomically.
    """
    path = Path(path)
    cs = np.load(path, allow_pickle=False)
    refs = [f"{int(i) + 1:06d}@{_decode(p)}" for p, i in zip(cs["blob/path"], cs["blob/idx"])]
    if len(cs) != len(stack) or (stack.image_refs is not None and refs != list(stack.image_refs)):
        raise ValueError(f"{path}: the file no longer holds the {len(stack)} particles the refinement read from it "
                         f"({len(cs)} rows now, or other blob/path, blob/idx); the refined poses are in the output "
                         "folder's particles.star")
    if "rlnRandomSubset" in stack.meta and "alignments3D/split" not in cs.dtype.names:
        grown = np.zeros(len(cs), dtype=cs.dtype.descr + [("alignments3D/split", "<u4")])
        for name in cs.dtype.names:
            grown[name] = cs[name]
        cs = grown
    cs["alignments3D/pose"], cs["alignments3D/shift"] = cryosparc_from_spider(stack.poses)
    if "rlnRandomSubset" in stack.meta:
        cs["alignments3D/split"] = np.clip(np.asarray(stack.meta["rlnRandomSubset"], dtype=np.int64) - 1, 0, 1)
    with atomic_path(path, overwrite=True) as tmp:
        _save(cs, tmp)
    return path


# ------------------------------------------------------------------------------------------------------ helpers
def _decode(p) -> str:
    s = p.decode("utf-8") if isinstance(p, bytes) else str(p)
    return s[1:] if s.startswith(">") else s


def _resolve_files(path: Path, files: list[str], project_dir) -> dict[str, Path]:
    """blob/path names -> files: relative to ``project_dir`` when given, else to the current folder, the .cs
    file's folder or its parent (a job folder <project>/J<n>/ inside the project)."""
    bases = [project_dir] if project_dir is not None else [".", path.parent, path.parent.parent]
    return find_image_files(
        path, files, bases,
        not_found_hint="blob/path is relative to the cryoSPARC project folder: keep the .cs file in its job folder "
                       "(<project>/J<n>/) or beside the stacks' folders, or check that the stacks were copied with "
                       "it",
        ambiguous_hint="run gpu-ali3d from the folder blob/path is relative to (the cryoSPARC project folder), or "
                       "remove the stale copy")


def _pixel_size(path: Path, cs: np.ndarray, images: MrcStackImages) -> float:
    if "blob/psize_A" in cs.dtype.names:
        apix = np.asarray(cs["blob/psize_A"], dtype=np.float64)
        if not np.all(np.isfinite(apix) & (apix > 0)):
            raise ValueError(f"{path}: blob/psize_A must be positive")
        if apix.max() - apix.min() > 1e-5 * apix.max():
            raise ValueError(f"{path}: particles have different pixel sizes ({apix.min():g} to {apix.max():g} A); "
                             "several pixel sizes in one stack are not supported yet")
        # float32 in the file: round to what was meant (e.g. 1.059999942779541 -> 1.06)
        return float(np.float64(np.format_float_positional(np.float32(apix[0]), unique=True)))
    header = mrc_voxel_size(images.files[0])
    return header if header is not None else 1.0


def _ctf(path: Path, cs: np.ndarray):
    names = cs.dtype.names
    present = [f for f in _CTF_FIELDS if f in names]
    if not present:
        return None
    if len(present) < len(_CTF_FIELDS):
        raise ValueError(f"{path}: incomplete CTF: {', '.join(f for f in _CTF_FIELDS if f not in names)} missing")
    if "ctf/phase_shift_rad" in names and np.any(np.abs(cs["ctf/phase_shift_rad"]) > 1e-6):
        raise ValueError(f"{path}: ctf/phase_shift_rad is not zero; phase-plate CTFs are not supported")
    g = lambda f: np.asarray(cs[f], dtype=np.float64)  # noqa: E731
    bfactor = g("ctf/bfactor") if "ctf/bfactor" in names else 0.0
    try:
        return from_relion(g("ctf/df1_A"), g("ctf/df2_A"), np.rad2deg(g("ctf/df_angle_rad")), g("ctf/accel_kv"),
                           g("ctf/cs_mm"), g("ctf/amp_contrast"), bfactor)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _table(stack: ParticleStack, files: list[str], index: np.ndarray) -> np.ndarray:
    n = len(stack)
    width = max(len(f.encode("utf-8")) for f in files)
    fields = [("uid", "<u8"), ("blob/path", f"S{width}"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
              ("blob/psize_A", "<f4"), ("alignments3D/split", "<u4"), ("alignments3D/pose", "<f4", (3,)),
              ("alignments3D/shift", "<f4", (2,)), ("alignments3D/psize_A", "<f4"),
              ("alignments3D/class_posterior", "<f4"), ("alignments3D/class", "<u4")]
    if stack.ctf is not None:
        fields += [(f, "<f4") for f in (*_CTF_FIELDS, "ctf/phase_shift_rad", "ctf/bfactor")]
    t = np.zeros(n, dtype=fields)
    t["uid"] = np.asarray(stack.meta["uid"], dtype=np.uint64) if "uid" in stack.meta else np.arange(n)
    t["blob/path"] = [f.encode("utf-8") for f in files]
    t["blob/idx"] = index
    t["blob/shape"] = stack.box
    t["blob/psize_A"] = t["alignments3D/psize_A"] = stack.apix_A
    if "rlnRandomSubset" in stack.meta:
        t["alignments3D/split"] = np.clip(np.asarray(stack.meta["rlnRandomSubset"], dtype=np.int64) - 1, 0, 1)
    else:
        t["alignments3D/split"] = np.arange(n) % 2
    t["alignments3D/class_posterior"] = 1.0
    if "rlnClassNumber" in stack.meta:
        t["alignments3D/class"] = np.clip(np.asarray(stack.meta["rlnClassNumber"], dtype=np.int64) - 1, 0, None)
    t["alignments3D/pose"], t["alignments3D/shift"] = cryosparc_from_spider(stack.poses)
    if stack.ctf is not None:
        c = stack.ctf
        t["ctf/df1_A"], t["ctf/df2_A"] = c.defocus_u_A, c.defocus_v_A
        t["ctf/df_angle_rad"] = np.deg2rad(c.astig_angle_deg)
        t["ctf/accel_kv"], t["ctf/cs_mm"], t["ctf/amp_contrast"] = c.voltage_kV, c.cs_mm, c.amp_contrast
        t["ctf/bfactor"] = c.bfactor_A2
    return t


def _save(table: np.ndarray, tmp: Path) -> None:
    with open(tmp, "wb") as fh:  # a file object: np.save would append .npy to a name
        np.save(fh, table, allow_pickle=False)
