"""MRC files: particle stacks read lazily through memory maps, stacks and volumes written atomically.

Arrays are in numpy (mrcfile) order: a stack is (n, ny, nx), a volume (nz, ny, nx); rows are y, columns x.
Stacks are written as float32 (mode 2) image stacks (ispg 0), volumes and masks as float32 volumes (ispg 1);
the voxel size goes into the header in Angstrom.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import mrcfile
import mrcfile.utils
import numpy as np

from .atomic import atomic_path
from .stack import ArrayImages, ImageSource, ParticleStack, check_finite

#: MRC modes holding real pixel values (int8, int16, float32, uint16, float16); complex modes are refused.
_REAL_MODES = (0, 1, 2, 6, 12)
#: Images written per chunk by :func:`write_mrc_stack` (64 MiB of float32 at box 256).
_WRITE_CHUNK = 256
#: At most this many stack files are kept open (memory-mapped) at once by one MrcStackImages.
_MAX_OPEN = 64


class MrcStackImages:
    """Images addressed by (MRC file, 0-based image index), possibly spread over many .mrcs files.

    refs : one (path, index) per image; index counts sections (z) of the file from 0. A 2-D file holds one image.
    name : what error messages name first (the metadata file the references came from, e.g. a STAR file).

    The headers are checked at construction (files exist and are complete MRC files, square images of one box,
    indices inside their files); pixel data are read on demand through ``mrcfile.mmap``, so only the images asked
    for are loaded. At most ``max_open`` files are held open at a time (least recently used are closed).
    NaN/inf pixels are reported by :meth:`read`, naming the file and image.
    """

    def __init__(self, refs: Sequence[tuple[str | os.PathLike, int]], name: str, *, max_open: int = _MAX_OPEN):
        self.name = str(name)
        self._max_open = max(1, int(max_open))
        file_ids: dict[Path, int] = {}
        fid = np.empty(len(refs), dtype=np.int64)
        local = np.empty(len(refs), dtype=np.int64)
        seen: dict = {}  # the refs' own path objects -> file number (making a Path per image is slow)
        for i, (path, index) in enumerate(refs):
            f = seen.get(path)
            if f is None:
                f = seen[path] = file_ids.setdefault(Path(path), len(file_ids))
            fid[i] = f
            local[i] = index
        self.files: list[Path] = list(file_ids)
        self._file_id = fid
        self._local = local
        self._handles: OrderedDict[int, mrcfile.mrcmemmap.MrcMemmap] = OrderedDict()
        if not self.files:
            raise ValueError(f"{self.name}: no images")
        self.box = self._check_headers()

    def __len__(self) -> int:
        return len(self._local)

    def refs(self) -> list[tuple[Path, int]]:
        """(file, 0-based index) of every image, as given at construction."""
        return [(self.files[f], int(i)) for f, i in zip(self._file_id, self._local)]

    def read(self, indices: np.ndarray) -> np.ndarray:
        """float32 (k, box, box) images at ``indices`` (integer array into this source)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.name}: image index out of range 0..{len(self) - 1}")
        out = np.empty((idx.size, self.box, self.box), dtype=np.float32)
        fids = self._file_id[idx]
        for f in np.unique(fids):
            sel = np.nonzero(fids == f)[0]
            local = self._local[idx[sel]]
            block = self._data(int(f))[local]  # fancy indexing on the memmap reads just these sections
            check_finite(block, f"{self.name}: {self.files[f]}", local)
            if len(sel) == len(idx):
                out[...] = block
            else:
                out[sel] = block
        return out

    def close(self) -> None:
        """Close the open memory maps (they are reopened on the next read)."""
        while self._handles:
            self._handles.popitem(last=False)[1].close()

    def __getstate__(self):  # picklable (for worker processes): open memory maps stay behind
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ----------------------------------------------------------------------------------------------- helpers
    def _check_headers(self) -> int:
        nfiles = len(self.files)
        lo = np.full(nfiles, np.iinfo(np.int64).max)
        hi = np.full(nfiles, -1)
        np.minimum.at(lo, self._file_id, self._local)
        np.maximum.at(hi, self._file_id, self._local)
        box = first = None
        for f, path in enumerate(self.files):
            header = _checked_header(path)
            nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
            if nx != ny:
                raise ValueError(f"{self.name}: {path} holds {nx} x {ny} pixel images; particle images must be square")
            if box is None:
                box, first = nx, path
            elif nx != box:
                raise ValueError(f"{self.name}: {path} holds {nx}-pixel images but {first} holds {box}-pixel images;"
                                 " all images must have the same box")
            if lo[f] < 0:
                raise ValueError(f"{self.name}: image {int(lo[f]) + 1}@{path}: image numbers start at 1")
            if hi[f] >= nz:
                raise ValueError(f"{self.name}: image {int(hi[f]) + 1}@{path} is past the end of {path} "
                                 f"({nz} images)")
        return int(box)

    def _data(self, f: int) -> np.ndarray:
        """The (nz, ny, nx) memory-mapped data of file number f, opening it if needed (LRU cache)."""
        handle = self._handles.get(f)
        if handle is None:
            path = self.files[f]
            try:
                handle = _open_mrc(path, mrcfile.mmap)
            except (ValueError, OSError) as exc:
                raise ValueError(f"{self.name}: {path}: not a readable MRC file (truncated?): {exc}") from None
            self._handles[f] = handle
            while len(self._handles) > self._max_open:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(f)
        data = handle.data
        return data[None] if data.ndim == 2 else data


def mrc_refs(source) -> list[tuple[Path, int]] | None:
    """(file, 0-based index) of every image when ``source`` reads them from MRC files that still exist, else None
    (images in memory or in other formats). Writers use it to point at the images instead of copying them."""
    if not isinstance(source, MrcStackImages):
        return None
    missing = [f for f in source.files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: the particle images' MRC file no longer exists")
    return source.refs()


def plan_image_refs(stack: ParticleStack, path: Path, *, kind: str, overwrite: bool
                    ) -> tuple[Path | None, list[str], np.ndarray]:
    """Where a metadata file written at ``path`` finds the stack's images, for STAR and .cs writers.

    Images already in MRC files are referenced; anything else (HDF, memory) goes to a new ``<stem>.mrcs`` beside
    ``path``. Returns (the new .mrcs path or None, each image's file as :func:`image_path_for_metadata` writes it,
    each image's 0-based index in it). kind names the metadata format in messages. Refuses an existing new .mrcs
    unless overwrite.
    """
    refs = mrc_refs(stack.images)
    if refs is None:
        mrcs_path = path.parent / (path.stem + ".mrcs")
        if mrcs_path == path:
            raise ValueError(f"{path}: a {kind} output must not be named .mrcs (the images go to {mrcs_path})")
        if not overwrite and mrcs_path.exists():
            raise FileExistsError(f"{mrcs_path}: output already exists; remove it or choose another name")
        return mrcs_path, [image_path_for_metadata(mrcs_path)] * len(stack), np.arange(len(stack))
    rel = {f: image_path_for_metadata(f) for f in {f for f, _ in refs}}
    return None, [rel[f] for f, _ in refs], np.array([i for _, i in refs], dtype=np.int64)


def image_path_for_metadata(file: str | os.PathLike) -> str:
    """An image file's path as STAR and .cs files we write hold it: as RELION resolves ``rlnImageName``.

    RELION (checked with RELION 3.1's relion_reconstruct) reads a relative image path relative to the current
    directory, the RELION project folder, not to the STAR file's folder. So a file inside the current directory is
    written relative to it (posix), and ``relion_reconstruct --i out/particles.star``, run where gpu-ali3d ran,
    finds it; a file outside it is written as an absolute path (a ``../`` path would hold from this folder only).
    """
    full = os.path.abspath(file)
    here = os.path.abspath(os.getcwd())
    try:
        rel = os.path.relpath(full, here)
    except ValueError:  # another drive (Windows)
        return Path(full).as_posix()
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return Path(full).as_posix()
    return Path(rel).as_posix()


def find_image_files(path: Path, files: list[str], bases: Sequence, *, not_found_hint: str,
                     ambiguous_hint: str) -> dict[str, Path]:
    """Each image file a metadata file names -> the file, found where its format says to look.

    path : the metadata file (named in the messages). files : the names as written. bases : the folders a relative
    name is looked for in, in order (an absolute name is itself). The first that holds the file wins; when a later
    one holds a different file, which is meant cannot be told: ValueError naming both, then ``ambiguous_hint``.
    None found: FileNotFoundError listing where it looked, then ``not_found_hint``. Returns absolute paths."""
    out = {}
    for f in files:
        p = Path(f)
        candidates = ([p] if p.is_absolute()
                      else list(dict.fromkeys(Path(os.path.abspath(Path(b) / p)) for b in bases)))
        found = [c for c in candidates if c.is_file()]
        if not found:
            where = " or ".join(str(c) for c in candidates)
            raise FileNotFoundError(f"{path}: image stack {f} not found (looked for {where}); {not_found_hint}")
        other = next((c for c in found[1:] if not os.path.samefile(c, found[0])), None)
        if other is not None:
            raise ValueError(f"{path}: image stack {f} is ambiguous: both {found[0]} and {other} exist and are "
                             f"different files; {ambiguous_hint}")
        out[f] = found[0]
    return out


def write_with_images(path: Path, mrcs_path: Path | None, stack: ParticleStack, write_metadata, *,
                      overwrite: bool) -> None:
    """Write a metadata file (``write_metadata(tmp_path)``) and, when mrcs_path is given, the stack's images
    there: all or nothing. Both are completed under temporary names; the .mrcs is renamed first, then the
    metadata, and a failure of the last step removes the new .mrcs."""
    committed: list[Path] = []
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            if mrcs_path is not None:
                with atomic_path(mrcs_path, overwrite=overwrite) as tmp_mrcs:
                    write_mrc_stack(tmp_mrcs, stack.images, stack.apix_A, overwrite=True)
                    write_metadata(tmp)
                committed.append(mrcs_path)
            else:
                write_metadata(tmp)
    except BaseException:
        for p in committed:
            p.unlink(missing_ok=True)
        raise


def read_mrc_stack(path: str | os.PathLike) -> ParticleStack:
    """A bare MRC stack (.mrcs) as a ParticleStack: no poses (zeros, ``has_poses`` False: a refinement refuses
    it), no CTF, pixel size from the header (1.0 if 0).

    image_refs are ``"000001@<file name>"`` (1-based, relative to the stack's own directory).
    """
    path = Path(path)
    n = int(_checked_header(path).nz)
    images = MrcStackImages([(path, i) for i in range(n)], str(path))
    apix = mrc_voxel_size(path)
    return ParticleStack(images=images, poses=np.zeros((n, 5)), apix_A=apix if apix is not None else 1.0, ctf=None,
                         image_refs=[f"{i + 1:06d}@{path.name}" for i in range(n)], has_poses=False)


def mrc_section_count(path: str | os.PathLike) -> int:
    """The number of sections (images of a stack) in an MRC file, from its checked header."""
    return int(_checked_header(Path(path)).nz)


def mrc_voxel_size(path: str | os.PathLike) -> float | None:
    """The x voxel size in the header of an MRC file, Angstrom; None when the header gives 0 (unset)."""
    header = _checked_header(Path(path))
    apix = float(header.cella.x) / int(header.mx) if int(header.mx) > 0 else 0.0
    return apix if np.isfinite(apix) and apix > 0 else None


def write_mrc_stack(path: str | os.PathLike, images_or_source: ImageSource | np.ndarray, apix_A: float, *,
                    overwrite: bool = False, chunk: int = _WRITE_CHUNK) -> Path:
    """Write images as a float32 (mode 2) MRC image stack (ispg 0) with voxel size ``apix_A``; returns the path.

    images_or_source : an ImageSource (read ``chunk`` images at a time, so any n fits in memory) or an array
        (n, box, box). NaN/inf pixels are an error. The file appears complete or not at all; an existing file is
        refused (FileExistsError) unless ``overwrite``.
    """
    source = _as_source(images_or_source)
    n, box = len(source), int(source.box)
    if n == 0:
        raise ValueError(f"{path}: no images to write")
    if not (np.isfinite(apix_A) and apix_A > 0):
        raise ValueError(f"{path}: pixel size must be positive, got apix_A={apix_A}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        with mrcfile.new_mmap(tmp, shape=(n, box, box), mrc_mode=2) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = float(apix_A)
            stats = _Stats()
            for start in range(0, n, chunk):
                idx = np.arange(start, min(start + chunk, n))
                block = source.read(idx)
                mrc.data[start:start + len(idx)] = block
                stats.add(block)
            stats.store(mrc.header)
            mrc.flush()
    return Path(path)


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """A 3-D MRC map (a reference or a mask) -> (float32 (nz, ny, nx), voxel size in A or None when the header has 0).

    Raises ValueError for a truncated or unreadable file, a 2-D image, anisotropic voxels or NaN/inf values.
    """
    path = Path(path)
    _checked_header(path)
    try:
        with _open_mrc(path) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32).copy()
            vs = mrc.voxel_size
            voxel = (float(vs.x), float(vs.y), float(vs.z))
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable MRC file (truncated?): {exc}") from None
    if data.ndim != 3:
        raise ValueError(f"{path}: holds a {data.ndim}-D image of shape {data.shape}; expected a 3-D volume")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{path}: volume contains NaN or inf values")
    apix = voxel[0]
    if apix <= 0:
        return data, None
    if any(v > 0 and abs(v - apix) > 1e-3 * apix for v in voxel[1:]):
        raise ValueError(f"{path}: anisotropic voxels {voxel} A are not supported; resample to cubic voxels")
    return data, apix


def write_volume(path: str | os.PathLike, vol: np.ndarray, apix_A: float | None = None, *,
                 overwrite: bool = False) -> Path:
    """Write a 3-D float32 volume (nz, ny, nx) as an MRC map (mode 2, ispg 1), voxel size ``apix_A`` (0 if None).

    Atomic; an existing file is refused (FileExistsError) unless ``overwrite``. Returns the path.
    """
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise ValueError(f"{path}: a volume must be 3-D (nz, ny, nx), got shape {vol.shape}")
    if not np.all(np.isfinite(vol)):
        raise ValueError(f"{path}: volume contains NaN or inf values; not written")
    if apix_A is not None and not (np.isfinite(apix_A) and apix_A > 0):
        raise ValueError(f"{path}: voxel size must be positive, got apix_A={apix_A}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        with mrcfile.new(tmp) as mrc:
            mrc.set_data(np.ascontiguousarray(vol, dtype=np.float32))
            mrc.set_volume()
            if apix_A is not None:
                mrc.voxel_size = float(apix_A)
            mrc.update_header_stats()
    return Path(path)


# ------------------------------------------------------------------------------------------------------ helpers
def _checked_header(path: Path):
    """The header of an MRC file, after checking that the file exists, parses, has a real-valued mode and is at
    least as long as the header says (truncated files are the common failure).

    Headers from before the MRC2014 standard (no ``MAP `` ID at byte 208, machine stamp often 0; e.g. cryoDRGN's
    and many older programs' stacks) are accepted, as RELION and ``mrcfile``'s permissive mode accept them, when
    the rest of the header is sane: a real-valued mode, positive dimensions and a file size that is exactly what
    the header describes. Anything else is refused naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: MRC file not found")
    try:
        with mrcfile.open(path, mode="r", header_only=True, permissive=False) as mrc:
            header = mrc.header.copy()
    except (ValueError, OSError) as exc:
        header = _legacy_header(path, exc)
    mode = int(header.mode)
    if mode not in _REAL_MODES:
        raise ValueError(f"{path}: MRC mode {mode} is not supported (expected real pixels: modes {_REAL_MODES})")
    itemsize = mrcfile.utils.dtype_from_mode(mode).itemsize
    expected = 1024 + int(header.nsymbt) + int(header.nx) * int(header.ny) * int(header.nz) * itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise ValueError(f"{path}: not a readable MRC file (truncated?): the header describes {int(header.nz)} "
                         f"sections of {int(header.nx)} x {int(header.ny)} pixels ({expected} bytes) but the file "
                         f"has {actual} bytes")
    return header


def _legacy_header(path: Path, strict_error: Exception):
    """The header of a pre-MRC2014 file (no map ID) when it is otherwise sane; ValueError naming the file if not."""
    reason = f"not a readable MRC file (truncated?): {strict_error}"
    if not any(k in str(strict_error).lower() for k in ("map id", "machine stamp")):
        raise ValueError(f"{path}: {reason}") from None
    why = "no header"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                header = mrc.header.copy() if mrc.header is not None else None
    except (ValueError, OSError) as exc:
        header = None
        why = str(exc)
    if header is None:
        raise ValueError(f"{path}: not a readable MRC file: no 'MAP ' ID at byte 208, and the header cannot be read as an "
                         f"older MRC header either ({why}); check that it is "
                         "an MRC stack and was copied completely") from None
    mode, nx, ny, nz, nsymbt = (int(header.mode), int(header.nx), int(header.ny), int(header.nz),
                                int(header.nsymbt))
    size = path.stat().st_size
    sane = mode in _REAL_MODES and min(nx, ny, nz) > 0 and nsymbt >= 0
    if sane:
        expected = 1024 + nsymbt + nx * ny * nz * mrcfile.utils.dtype_from_mode(mode).itemsize
        sane = expected == size
    if not sane:
        raise ValueError(f"{path}: not a readable MRC file: no 'MAP ' ID at byte 208, and the header is not that of an older "
                         f"MRC file either (mode {mode}, {nx} x {ny} x {nz} pixels, {nsymbt} extended header bytes "
                         f"for a file of {size} bytes); check that it is an MRC stack and was copied completely")
    return header


def _open_mrc(path: Path, opener=mrcfile.open, **kwargs):
    """``opener(path, mode="r", ...)``, strict first; a pre-MRC2014 file that :func:`_checked_header` accepts is
    opened in mrcfile's permissive mode (its warnings about the missing map ID silenced)."""
    try:
        return opener(path, mode="r", permissive=False, **kwargs)
    except ValueError as exc:
        _legacy_header(path, exc)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return opener(path, mode="r", permissive=True, **kwargs)


def _as_source(images_or_source) -> ImageSource:
    if hasattr(images_or_source, "read") and hasattr(images_or_source, "box"):
        return images_or_source
    return ArrayImages(np.asarray(images_or_source))


class _Stats:
    """Running min/max/mean/rms of float32 blocks, for the MRC header (float64 accumulation)."""

    def __init__(self):
        self.n, self.s, self.s2 = 0, 0.0, 0.0
        self.lo, self.hi = np.inf, -np.inf

    def add(self, block: np.ndarray) -> None:
        b = block.astype(np.float64, copy=False)
        self.n += b.size
        self.s += float(b.sum())
        self.s2 += float((b * b).sum())
        self.lo, self.hi = min(self.lo, float(b.min())), max(self.hi, float(b.max()))

    def store(self, header) -> None:
        mean = self.s / self.n
        header.dmin, header.dmax, header.dmean = self.lo, self.hi, mean
        header.rms = np.sqrt(max(self.s2 / self.n - mean * mean, 0.0))
