"""RELION STAR particle files (3.0 and 3.1+) <-> ParticleStack, images in MRC stacks.

Reading: RELION 3.1+ files have a ``data_optics`` table whose values are merged into each particle through
``rlnOpticsGroup``, and ``rlnOriginX/YAngst`` in Angstrom; RELION 3.0 files have one table, ``rlnOriginX/Y`` in
pixels and the optics values on every particle. Poses go through :func:`geometry.relion_to_spider` (RELION's
angles are SPIDER's; origin / pixel size = SPARX shift, same sign), the CTF through :func:`ctf.from_relion`.

What the stack keeps of a STAR file (so that reading and writing again loses nothing we do not interpret):

* ``stack.meta[label]``: every per-particle column not turned into poses, CTF, pixel size or image references
  (``rlnRandomSubset``, ``rlnClassNumber``, ``rlnMicrographName``, ...), as numpy arrays.
* ``stack.meta["optics:" + label]``: the optics table, spread out per particle (each particle carries its group's
  row): ``optics:rlnOpticsGroup``, ``optics:rlnOpticsGroupName``, beam tilt, ... . Spreading keeps the table
  valid through subsetting. Pixel size, image size and (when there is a CTF) voltage, Cs and amplitude contrast are
  not kept there: they live in ``stack.apix_A``, ``stack.box`` and ``stack.ctf``. See :data:`OPTICS_PREFIX`.

Writing builds the optics table back from those: one group per distinct (kept group, voltage, Cs, amplitude
contrast); a stack without optics keys gets one group. Only meta keys that start with ``rln`` are written as columns.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..ctf import from_relion, to_relion
from ..geometry import relion_to_spider, spider_to_relion
from .atomic import atomic_path, refuse_existing
from .mrc import (MrcStackImages, find_image_files, mrc_section_count, mrc_voxel_size, plan_image_refs,
                  write_with_images)
from .stack import ParticleStack

#: Prefix of the ``stack.meta`` keys that hold the optics table, one value per particle.
OPTICS_PREFIX = "optics:"

_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_ORIGINS_A = ("rlnOriginXAngst", "rlnOriginYAngst")
_ORIGINS_PX = ("rlnOriginX", "rlnOriginY")
_OPTICS_CTF = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
_PIXEL_SIZE = ("rlnImagePixelSize", "rlnPixelSize", "rlnDetectorPixelSize", "rlnMagnification")
#: Per-particle columns always interpreted (never kept in meta).
_CONSUMED = ("rlnImageName", *_ANGLES, *_ORIGINS_A, *_ORIGINS_PX, "rlnOpticsGroup", *_PIXEL_SIZE, "rlnImageSize")
_CONSUMED_CTF = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor", *_OPTICS_CTF)
#: Written per particle by version 3.0 from the optics keys when present (RELION 3.0 knows these labels).
_OPTICS_PER_PARTICLE_30 = (*_OPTICS_CTF, "rlnBeamTiltX", "rlnBeamTiltY")
#: Optics values RELION needs to read a 3.1 file; written only when the stack has no CTF and no kept values.
_OPTICS_PLACEHOLDERS = {"rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}
_FLOAT_FORMAT = "%.12g"
#: RELION's amplitude contrast when a file gives none (``MlOptimiser``/``CTF::readByGroup`` default, 0.1).
RELION_DEFAULT_AMPLITUDE_CONTRAST = 0.1


def is_star(path: str | os.PathLike) -> bool:
    """True for a ``.star`` name, or an existing file whose first data line is a STAR ``data_`` block."""
    p = Path(path)
    if p.suffix.lower() == ".star":
        return True
    if not p.is_file():
        return False
    try:
        with open(p, "r", encoding="utf-8", errors="replace") as fh:
            for _, line in zip(range(200), fh):
                s = line.strip()
                if s and not s.startswith("#"):
                    return s.startswith("data_")
    except OSError:
        return False
    return False


def read_star(path: str | os.PathLike, *, image_dir: str | os.PathLike | None = None) -> ParticleStack:
    """A RELION particle STAR file (3.0 or 3.1+) -> ParticleStack with lazily read MRC images.

    Image names ``index@stack.mrcs`` (1-based) are found relative to ``image_dir`` when given, else as RELION
    finds them, relative to the current directory (the RELION project folder), else relative to the STAR file's
    folder; a name that both resolve to different files is an error (:func:`_resolve_files`). ``image_refs`` keep
    the names as written in the file. See the module docstring for what goes into ``meta``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: STAR file not found")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted errors for malformed input
        raise ValueError(f"{path}: not a readable STAR file: {exc}") from None
    blocks = {k: (pd.DataFrame([v]) if isinstance(v, dict) else v) for k, v in blocks.items()}
    particles = _particle_table(path, blocks)
    _refuse_tomography(path, blocks)
    n = len(particles)
    optics = blocks.get("optics")
    cols = {c: particles[c].to_numpy() for c in particles.columns}
    from_optics: dict[str, np.ndarray] = {}
    if optics is not None and len(optics):
        from_optics = _spread_optics(path, optics, cols, n)

    merged = {**from_optics, **cols}
    missing = [c for c in _ANGLES if c not in merged]
    if missing:
        raise ValueError(
            f"{path}: no angle columns ({', '.join(_ANGLES)}): {', '.join(missing)} missing. Local refinement needs "
            "starting poses: give the _data.star of a RELION 3D auto-refine or 3D classification (or of another "
            "global search), not a file from extraction or 2D classification")

    names = [str(s) for s in merged["rlnImageName"]]
    files, index, whole = _parse_image_names(path, names)
    resolved = _resolve_files(path, sorted(set(files)), image_dir)
    _check_whole_files(path, names, files, whole, resolved)
    images = MrcStackImages([(resolved[f], i) for f, i in zip(files, index)], str(path))
    _check_image_size(path, merged, images)

    apix = _pixel_size(path, merged, images)
    origins_px = _origins_px(path, merged, apix)
    rot, tilt, psi = (_numbers(path, merged, c) for c in _ANGLES)
    poses = relion_to_spider(rot, tilt, psi, origins_px[0], origins_px[1], 1.0)
    ctf, ctf_notes, ctf_refusal = _ctf(path, merged)

    consumed = set(_CONSUMED) | (set(_CONSUMED_CTF) if ctf is not None else set())
    meta: dict[str, np.ndarray] = {}
    for c, v in cols.items():
        if c in _OPTICS_CTF and ctf is None:
            meta[OPTICS_PREFIX + c] = v  # RELION 3.0: optics values per particle, no CTF to hold them
        elif c not in consumed:
            meta[c] = v
    for c, v in from_optics.items():  # rlnOpticsGroup included: each particle's group
        if c == "rlnOpticsGroup" or c not in consumed:
            meta[OPTICS_PREFIX + c] = v
    try:
        return ParticleStack(images=images, poses=poses, apix_A=apix, ctf=ctf, image_refs=names, meta=meta,
                             ctf_notes=ctf_notes, ctf_refusal=ctf_refusal)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_star(stack: ParticleStack, path: str | os.PathLike, *, version: str = "3.1",
               overwrite: bool = False) -> Path:
    """Write a ParticleStack as a RELION STAR file (``version="3.1"``: optics + particles; ``"3.0"``: one table).

    Images read from MRC files are referenced, not copied; other images (HDF, memory) are written to
    ``<star stem>.mrcs`` beside the STAR file. rlnImageName paths are written as RELION reads them: relative to the
    current directory (absolute for files outside it; :func:`mrc.image_path_for_metadata`), so RELION run from
    the folder gpu-ali3d ran in finds the images. All or nothing: on failure neither the STAR file nor a new .mrcs
    remains. Existing outputs are refused (FileExistsError) unless ``overwrite``. An odd box is written, with an
    :class:`OddBoxWarning` (one line; the CLI says it once per command).
    """
    if version not in ("3.0", "3.1"):
        raise ValueError(f"version={version!r}: expected '3.1' (optics table) or '3.0' (one table)")
    path = Path(path)
    if not overwrite:
        refuse_existing(path)
    if stack.box % 2:
        warnings.warn(OddBoxWarning(odd_box_message(stack.box)), stacklevel=2)
    mrcs_path, files, index = plan_image_refs(stack, path, kind="STAR", overwrite=overwrite)
    names = [f"{i + 1:06d}@{f}" for f, i in zip(files, index)]
    blocks = _tables_31(stack, names) if version == "3.1" else {"": _table_30(stack, names)}
    write_with_images(path, mrcs_path, stack,
                      lambda tmp: starfile.write(blocks, tmp, float_format=_FLOAT_FORMAT), overwrite=overwrite)
    return path


def replace_star_poses(stack: ParticleStack, path: str | os.PathLike) -> Path:
    """Write ``stack``'s poses into the STAR file it was read from (``--write-headers``), everything else as it was.

    Only the angle columns, the origin columns (in the file's own units: rlnOriginX/YAngst in Angstrom, or RELION
    3.0's rlnOriginX/Y in pixels; a file with neither gets rlnOriginX/YAngst when it has an optics table, else
    rlnOriginX/Y) and rlnRandomSubset (``stack.meta``'s, the half sets a refinement used) change. rlnImageName, the
    optics table, the CTF and every other column and block keep the file's values: the image paths stay exactly as
    the user's file gives them. The file must still hold the particles the stack was read from (as many, with the
    same rlnImageName in the same order): ValueError otherwise. The new file replaces the old one atomically.
    """
    path = Path(path)
    blocks = starfile.read(path, always_dict=True)
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame) and "rlnImageName" in v.columns}
    key = "particles" if "particles" in tables else next(iter(tables), None)
    if key is None:
        raise ValueError(f"{path}: no particle table to write the poses into")
    table = tables[key].copy()
    names = [str(s) for s in table["rlnImageName"]]
    if len(table) != len(stack) or (stack.image_refs is not None and names != list(stack.image_refs)):
        raise ValueError(f"{path}: the file no longer holds the {len(stack)} particles the refinement read from it "
                         f"({len(table)} rows now, or other rlnImageName values); the refined poses are in the "
                         "output folder's particles.star")
    rel = spider_to_relion(stack.poses, stack.apix_A)
    for c in _ANGLES:
        table[c] = rel[c]
    angstrom = all(c in table.columns for c in _ORIGINS_A) or (
        not all(c in table.columns for c in _ORIGINS_PX) and "optics" in blocks)
    if angstrom:
        for c in _ORIGINS_A:
            table[c] = rel[c]
    else:
        table["rlnOriginX"], table["rlnOriginY"] = stack.poses[:, 3].copy(), stack.poses[:, 4].copy()
    if "rlnRandomSubset" in stack.meta:
        table["rlnRandomSubset"] = np.asarray(stack.meta["rlnRandomSubset"], dtype=np.int64)
    blocks = {**blocks, key: table}
    with atomic_path(path, overwrite=True) as tmp:
        starfile.write(blocks, tmp, float_format=_FLOAT_FORMAT)
    return path


class OddBoxWarning(UserWarning):
    """Particles with an odd box written to a RELION file."""


def odd_box_message(box: int) -> str:
    """The one line said when odd-box particles go to a RELION STAR file."""
    return (f"the particles' box is {box} pixels, an odd size: RELION extracts even boxes only and mishandles odd "
            "ones (its projections of them are a pixel off); pad or crop them to an even box for RELION")


# ------------------------------------------------------------------------------------------------ read helpers
def _particle_table(path: Path, blocks: dict) -> pd.DataFrame:
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame) and "rlnImageName" in v.columns}
    if not tables:
        raise ValueError(f"{path}: no particle table (no block with an rlnImageName column; blocks: "
                         f"{', '.join(repr(k) for k in blocks) or 'none'}); expected a RELION particle STAR file")
    table = tables.get("particles", next(iter(tables.values())))
    if len(table) == 0:
        raise ValueError(f"{path}: the particle table is empty")
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame) and block.columns.duplicated().any():
            twice = block.columns[block.columns.duplicated()][0]
            raise ValueError(f"{path}: data_{name} has the column {twice} twice; keep one")
    return table


def _spread_optics(path: Path, optics: pd.DataFrame, cols: dict, n: int) -> dict[str, np.ndarray]:
    """The optics table's columns with one value per particle (the row of the particle's rlnOpticsGroup)."""
    if "rlnOpticsGroup" not in optics.columns:
        raise ValueError(f"{path}: data_optics has no rlnOpticsGroup column")
    groups = optics["rlnOpticsGroup"].to_numpy()
    if "rlnOpticsGroup" in cols:
        rows = pd.Index(groups).get_indexer(cols["rlnOpticsGroup"])
        if (rows < 0).any():
            i = int(np.nonzero(rows < 0)[0][0])
            raise ValueError(f"{path}: particle {i + 1} has rlnOpticsGroup {cols['rlnOpticsGroup'][i]}, which "
                             f"data_optics does not list (groups {groups.tolist()})")
    elif len(optics) == 1:
        rows = np.zeros(n, dtype=np.int64)
    else:
        raise ValueError(f"{path}: data_particles has no rlnOpticsGroup column but data_optics has "
                         f"{len(optics)} groups")
    return {c: optics[c].to_numpy()[rows] for c in optics.columns}


def _parse_image_names(path: Path, names: list[str]) -> tuple[list[str], list[int], np.ndarray]:
    """``index@file`` (1-based) -> (file names, 0-based indices, which names had no '@'). A name without '@' is,
    as in RELION, the whole file: a single-image file (image 1; :func:`_check_whole_files` checks that it holds
    one image). RELION's type suffixes ``:mrcs`` / ``:mrc`` are dropped."""
    files, index = [], []
    whole = np.zeros(len(names), dtype=bool)
    for k, name in enumerate(names):
        at, sep, file = name.partition("@")
        if not sep:
            at, file = "1", name
            whole[k] = True
        for suffix in (":mrcs", ":mrc"):
            if file.endswith(suffix):
                file = file[: -len(suffix)]
        try:
            i = int(at)
        except ValueError:
            i = 0
        if i < 1 or not file:
            raise ValueError(f"{path}: particle {k + 1}: rlnImageName {name!r} is not of the form "
                             "'index@stack.mrcs' with a 1-based index")
        files.append(file)
        index.append(i - 1)
    return files, index, whole


def _check_whole_files(path: Path, names: list[str], files: list[str], whole: np.ndarray,
                       resolved: dict[str, Path]) -> None:
    """A name without '@' means the whole file (RELION): it must hold one 2-D image, not a stack."""
    checked: dict[str, int] = {}
    for k in np.nonzero(whole)[0]:
        f = files[k]
        if f not in checked:
            checked[f] = mrc_section_count(resolved[f])
        if checked[f] != 1:
            raise ValueError(f"{path}: particle {k + 1}: rlnImageName {names[k]!r} has no 'index@' and so names the "
                             f"whole file, but {resolved[f]} holds {checked[f]} images; write 'index@{f}' "
                             "(1-based) for an image of a stack")


def _refuse_tomography(path: Path, blocks: dict) -> None:
    """RELION 5 tomography files (subtomograms or tilt-series stacks per particle) are not single-particle data."""
    for name, table in blocks.items():
        if not isinstance(table, pd.DataFrame):
            continue
        tomo = [c for c in table.columns if str(c).startswith("rlnTomo")]
        if tomo:
            raise ValueError(f"{path}: a RELION tomography file (data_{name} has {tomo[0]}): its particles are "
                             "subtomograms or tilt series, and gpu-ali3d refines single-particle 2-D images only; "
                             "refine them with RELION's tomography pipeline")
        if "rlnImageDimensionality" in table.columns:
            dims = pd.to_numeric(table["rlnImageDimensionality"], errors="coerce").to_numpy()
            if np.any(dims != 2):
                bad = table["rlnImageDimensionality"].to_numpy()[dims != 2][0]
                raise ValueError(f"{path}: rlnImageDimensionality {bad} in data_{name}: the particles are 3-D "
                                 "(subtomograms) and gpu-ali3d refines single-particle 2-D images only; refine "
                                 "them with RELION's tomography pipeline")


def _check_image_size(path: Path, cols: dict, images: MrcStackImages) -> None:
    """rlnImageSize (data_optics, or per particle in 3.0) must be the box of the images the file points at."""
    if "rlnImageSize" not in cols:
        return
    size = pd.to_numeric(pd.Series(cols["rlnImageSize"]), errors="coerce").to_numpy(dtype=np.float64)
    bad = np.nonzero(size != images.box)[0]
    if bad.size:
        k = int(bad[0])
        group = f" (optics group {cols['rlnOpticsGroup'][k]})" if "rlnOpticsGroup" in cols else ""
        raise ValueError(f"{path}: rlnImageSize is {cols['rlnImageSize'][k]}{group} but the images of particle "
                         f"{k + 1} in {images.files[int(images._file_id[k])]} are {images.box} pixels; correct "
                         "rlnImageSize or the image paths")


def _resolve_files(path: Path, files: list[str], image_dir) -> dict[str, Path]:
    """Each image file rlnImageName names -> the file, as RELION finds it, with one fallback.

    RELION reads a relative path relative to the current directory (the RELION project folder), not to the STAR
    file's folder (checked: RELION 3.1's relion_reconstruct, run from the project folder, reads
    ``Extract/job005/x.mrcs`` named by ``Refine3D/job010/run_data.star`` and fails on a path relative to the STAR's
    folder: "Cannot read file ../sim.mrcs"). So a relative path is looked for there first. When it is not there,
    it is looked for beside the STAR file: STAR files written that way (by gpu-ali3d before it wrote paths as RELION
    reads them, by other tools, or copied with their stacks) keep working. When both places hold a file and they are
    different files, which one is meant cannot be told: ValueError naming both. With ``image_dir`` only
    ``image_dir / path`` is looked at. Found files are returned as absolute paths.
    """
    bases = [image_dir] if image_dir is not None else [".", path.parent]   # RELION's convention, then the STAR's
    return find_image_files(
        path, files, bases,
        not_found_hint="image paths in a STAR file are relative to the RELION project folder or to the STAR file's "
                       "folder: run gpu-ali3d from the project folder, or check that the stacks were copied with the "
                       "STAR file",
        ambiguous_hint="the first is relative to the current folder, where RELION looks, the second to the STAR "
                       "file's folder; run gpu-ali3d from the folder the image paths are relative to (for RELION "
                       "files the project folder), or remove the stale copy")


def _pixel_size(path: Path, cols: dict, images: MrcStackImages) -> float:
    """Pixel size in A: rlnImagePixelSize, rlnPixelSize, or rlnDetectorPixelSize * 1e4 / rlnMagnification;
    else the first stack's header; else 1.0 (only when no shift is given in Angstrom)."""
    apix = None
    for c in ("rlnImagePixelSize", "rlnPixelSize"):
        if c in cols:
            apix = np.asarray(cols[c], dtype=float)
            break
    if apix is None and "rlnDetectorPixelSize" in cols and "rlnMagnification" in cols:
        apix = np.asarray(cols["rlnDetectorPixelSize"], dtype=float) * 1e4 / np.asarray(cols["rlnMagnification"],
                                                                                         dtype=float)
    if apix is not None:
        if not np.all(np.isfinite(apix) & (apix > 0)):
            raise ValueError(f"{path}: pixel size must be positive, got {apix[~(np.isfinite(apix) & (apix > 0))][0]}")
        lo, hi = float(apix.min()), float(apix.max())
        if hi - lo > 1e-6 * hi:
            raise ValueError(f"{path}: particles have different pixel sizes ({lo:g} to {hi:g} A; several optics "
                             "groups with different pixel sizes are not supported yet); rescale to one pixel size "
                             "or refine each group separately")
        return float(apix[0])
    header_apix = mrc_voxel_size(images.files[0])
    if header_apix is not None:
        return header_apix
    if any(c in cols for c in _ORIGINS_A):
        raise ValueError(f"{path}: shifts are in Angstrom (rlnOriginXAngst) but no pixel size is given "
                         "(rlnImagePixelSize in data_optics) nor in the header of " + str(images.files[0]))
    return 1.0


def _numbers(path: Path, cols: dict, label: str) -> np.ndarray:
    """Column ``label`` as float64; ValueError naming the file, column and particle for text that is no number."""
    values = pd.to_numeric(pd.Series(cols[label]), errors="coerce").to_numpy(dtype=np.float64)
    for i in np.nonzero(np.isnan(values))[0]:  # 'nan' itself is left for the finiteness checks downstream
        if str(cols[label][i]).strip().lower() != "nan":
            raise ValueError(f"{path}: particle {i + 1}: {label} = {cols[label][i]!r} is not a number")
    return values


def _origins_px(path: Path, cols: dict, apix: float) -> tuple[np.ndarray, np.ndarray]:
    for pair, scale in ((_ORIGINS_A, apix), (_ORIGINS_PX, 1.0)):
        present = [c in cols for c in pair]
        if all(present):
            return _numbers(path, cols, pair[0]) / scale, _numbers(path, cols, pair[1]) / scale
        if any(present):
            raise ValueError(f"{path}: {pair[present.index(True)]} without {pair[present.index(False)]}")
    n = len(cols["rlnImageName"])
    return np.zeros(n), np.zeros(n)


def _ctf(path: Path, cols: dict):
    """(CTFParams or None, notes to say once, why --CTF must be refused or None).

    Only what the CTF needs is required, and only when it is used: without rlnVoltage or rlnSphericalAberration
    the stack has no CTF (and --CTF is refused, saying what is missing); without rlnAmplitudeContrast RELION's
    default 0.1 is used (and said). rlnCtfBfactor is the envelope B-factor (``bfactor_A2``, RELION's sign).
    Images already multiplied by their CTF (rlnCtfDataAreCtfPremultiplied = 1) or with an rlnCtfScalefactor other
    than 1 (CTFParams has no scale) keep their CTF for the outputs but refuse --CTF."""
    if "rlnDefocusU" not in cols:
        return None, [], None
    missing = [c for c in ("rlnVoltage", "rlnSphericalAberration") if c not in cols]
    if missing:
        return None, [], (f"{path}: defocus is given but {', '.join(missing)} not (needed for the CTF); add them "
                          "to data_optics (RELION 3.1) or to every particle (3.0), or run without --CTF")
    if "rlnPhaseShift" in cols and np.any(np.abs(np.asarray(cols["rlnPhaseShift"], dtype=float)) > 1e-6):
        raise ValueError(f"{path}: rlnPhaseShift is not zero; phase-plate CTFs are not supported")
    notes = []
    if "rlnAmplitudeContrast" not in cols:
        notes.append(f"{path}: no rlnAmplitudeContrast; using RELION's default amplitude contrast "
                     f"{RELION_DEFAULT_AMPLITUDE_CONTRAST:g} for the CTF")
    n = len(cols["rlnDefocusU"])

    def f(c, default=None):          # a column as float64, text that is no number named by file, column and particle
        return _numbers(path, cols, c) if c in cols else np.full(n, default, dtype=float)
    try:
        ctf = from_relion(f("rlnDefocusU"), f("rlnDefocusV") if "rlnDefocusV" in cols else f("rlnDefocusU"),
                          f("rlnDefocusAngle", 0.0),
                          f("rlnVoltage"), f("rlnSphericalAberration"),
                          f("rlnAmplitudeContrast", RELION_DEFAULT_AMPLITUDE_CONTRAST), f("rlnCtfBfactor", 0.0))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    refusal = None
    if "rlnCtfDataAreCtfPremultiplied" in cols:
        premultiplied = pd.to_numeric(pd.Series(cols["rlnCtfDataAreCtfPremultiplied"]), errors="coerce").to_numpy()
        if np.any(premultiplied != 0):
            refusal = (f"{path}: rlnCtfDataAreCtfPremultiplied = 1: the images were already multiplied by their "
                       "CTF, and --CTF would apply it a second time (not supported); re-extract the particles "
                       "without CTF premultiplication, or run without --CTF")
    if refusal is None and "rlnCtfScalefactor" in cols:
        scale = f("rlnCtfScalefactor")
        if np.any(np.abs(scale - 1.0) > 1e-6):
            k = int(np.nonzero(np.abs(scale - 1.0) > 1e-6)[0][0])
            refusal = (f"{path}: particle {k + 1}: rlnCtfScalefactor = {scale[k]:g}; only 1 is supported (the CTF "
                       "scale is not applied); set rlnCtfScalefactor to 1, or run without --CTF")
    return ctf, notes, refusal


# ----------------------------------------------------------------------------------------------- write helpers
def _particle_columns(stack: ParticleStack, names: list[str], origins: str) -> dict[str, np.ndarray]:
    rel = spider_to_relion(stack.poses, stack.apix_A)
    cols: dict[str, np.ndarray] = {"rlnImageName": np.asarray(names, dtype=object)}
    cols.update({c: rel[c] for c in _ANGLES})
    if origins == "A":
        cols.update({c: rel[c] for c in _ORIGINS_A})
    else:
        cols["rlnOriginX"], cols["rlnOriginY"] = stack.poses[:, 3].copy(), stack.poses[:, 4].copy()
    if stack.ctf is not None:
        cols.update(to_relion(stack.ctf))
    return cols


def _add_meta(cols: dict, stack: ParticleStack) -> None:
    for k, v in stack.meta.items():
        if k.startswith("rln") and k not in cols and k not in _CONSUMED:
            cols[k] = np.asarray(v)


def _tables_31(stack: ParticleStack, names: list[str]) -> dict[str, pd.DataFrame]:
    n = len(stack)
    meta = stack.meta
    opt = {k[len(OPTICS_PREFIX):]: np.asarray(v) for k, v in meta.items() if k.startswith(OPTICS_PREFIX)}
    old = np.asarray(opt.get("rlnOpticsGroup", np.ones(n)), dtype=float)
    keys = [old]
    if stack.ctf is not None:
        keys += [stack.ctf.voltage_kV, stack.ctf.cs_mm, stack.ctf.amp_contrast]
    uniq, first, inverse = np.unique(np.column_stack(keys), axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    kept = len(np.unique(uniq[:, 0])) == len(uniq) and np.all(uniq[:, 0] >= 1) and np.all(uniq[:, 0] % 1 == 0)
    numbers = uniq[:, 0].astype(np.int64) if kept else np.arange(1, len(uniq) + 1)

    optics: dict[str, np.ndarray] = {"rlnOpticsGroup": numbers}
    if kept and "rlnOpticsGroupName" in opt:
        optics["rlnOpticsGroupName"] = opt["rlnOpticsGroupName"][first]
    else:
        optics["rlnOpticsGroupName"] = np.array([f"opticsGroup{g}" for g in numbers], dtype=object)
    if stack.ctf is not None:
        optics["rlnAmplitudeContrast"] = stack.ctf.amp_contrast[first]
        optics["rlnSphericalAberration"] = stack.ctf.cs_mm[first]
        optics["rlnVoltage"] = stack.ctf.voltage_kV[first]
    else:
        for c in ("rlnAmplitudeContrast", "rlnSphericalAberration", "rlnVoltage"):
            optics[c] = opt[c][first] if c in opt else np.full(len(first), _OPTICS_PLACEHOLDERS[c])
    optics["rlnImagePixelSize"] = np.full(len(first), float(stack.apix_A))
    optics["rlnImageSize"] = np.full(len(first), int(stack.box))
    optics["rlnImageDimensionality"] = opt["rlnImageDimensionality"][first] if "rlnImageDimensionality" in opt \
        else np.full(len(first), 2)
    for c, v in opt.items():
        if c not in optics and c not in _PIXEL_SIZE:
            optics[c] = v[first]

    cols = _particle_columns(stack, names, "A")
    cols["rlnOpticsGroup"] = numbers[inverse]
    _add_meta(cols, stack)
    return {"optics": pd.DataFrame(optics), "particles": pd.DataFrame(cols)}


def _table_30(stack: ParticleStack, names: list[str]) -> pd.DataFrame:
    n = len(stack)
    cols = _particle_columns(stack, names, "px")
    if stack.ctf is not None:
        cols["rlnVoltage"] = stack.ctf.voltage_kV
        cols["rlnSphericalAberration"] = stack.ctf.cs_mm
        cols["rlnAmplitudeContrast"] = stack.ctf.amp_contrast
    for c in _OPTICS_PER_PARTICLE_30:
        if c not in cols and OPTICS_PREFIX + c in stack.meta:
            cols[c] = np.asarray(stack.meta[OPTICS_PREFIX + c])
    # RELION 3.0's pixel size: rlnDetectorPixelSize (micrometres) * 1e4 / rlnMagnification.
    cols["rlnMagnification"] = np.full(n, 10000.0)
    cols["rlnDetectorPixelSize"] = np.full(n, float(stack.apix_A))
    _add_meta(cols, stack)
    return pd.DataFrame(cols)
