"""The in-memory particle stack every format reads into and writes from, and lazy image sources.

A :class:`ParticleStack` holds n square images (read lazily, in chunks), their poses in gpu-ali3d's convention
(``geometry`` module: SPIDER ZYZ degrees, SPARX shift sign in pixels), their CTF parameters, the pixel size and,
for each image, a reference to where it came from so that outputs can point back at the original data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from ..ctf import CTFParams
from ..geometry import POSE_COLUMNS


class ImageSource(Protocol):
    """n square float32 images, read on demand.

    ``len(src)`` is n, ``src.box`` the side in pixels; ``src.read(indices)`` returns float32 (k, box, box) for an
    integer array of indices (numpy order: rows = y, columns = x) and raises ValueError naming the file and image
    if an image is unreadable or holds NaN/inf.
    """

    box: int

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> np.ndarray: ...


class ArrayImages:
    """Images already in memory: float32 array (n, box, box)."""

    def __init__(self, images: np.ndarray, name: str = "<array>"):
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"{name}: images must be square, shape (n, box, box); got {images.shape}")
        self._images = images.astype(np.float32, copy=False)
        self.box = images.shape[1]
        self.name = name

    def __len__(self) -> int:
        return len(self._images)

    def read(self, indices: np.ndarray) -> np.ndarray:
        out = self._images[np.asarray(indices, dtype=np.int64)]
        check_finite(out, self.name, indices)
        return out


class StreamedImages:
    """Images of an :class:`ImageSource` read only when they are used: refine's stand-in for the (k, box, box)
    float32 array of a rank's images when they exceed its image budget (issue 12: stacks larger than memory).

    Indexing with a slice or an integer array gives another StreamedImages (nothing is read); ``np.asarray``
    (:func:`materialise`) reads them, one ``source.read`` (memory-mapped MRC pages, HDF images one by one), so
    a batch or chunk is in memory only while it is used. ``shape``, ``ndim``, ``dtype`` and ``len`` are an array's.
    """

    def __init__(self, source: ImageSource, indices: np.ndarray):
        self._source = source
        self._indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.shape = (len(self._indices), source.box, source.box)
        self.ndim = 3
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self._indices)

    @property
    def nbytes(self) -> int:
        """Bytes these images take once read (float32)."""
        return int(np.prod(self.shape)) * 4

    def __getitem__(self, key) -> "StreamedImages":
        if isinstance(key, slice) or (isinstance(key, np.ndarray) and key.dtype.kind in "iu" and key.ndim == 1):
            return StreamedImages(self._source, self._indices[key])
        raise TypeError(f"streamed images take a slice or a 1-d integer array as index, not {type(key).__name__}")

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._source.read(self._indices)
        return out if dtype is None else out.astype(dtype, copy=False)


def materialise(images):
    """``images`` as an array: :class:`StreamedImages` read into a float32 numpy array, anything else as it is
    (a numpy or device array)."""
    return np.asarray(images) if isinstance(images, StreamedImages) else images


@dataclass
class ParticleStack:
    """Particles with poses and CTFs.

    images : ImageSource of n float32 (box, box) images (lazy).
    poses : float64 (n, 5): phi, theta, psi (degrees, SPIDER ZYZ), sx, sy (pixels, SPARX sign); POSE_COLUMNS.
    apix_A : pixel size in Angstrom (1.0 when the source does not say).
    ctf : CTFParams of the n particles, or None when the source has none.
    image_refs : for each image, where it lives, as ``"index@path"`` with a 1-based index (RELION's form) for
        every format, MRC stacks and HDF files alike; path as the source gave it (for STAR files relative to the RELION
        project folder, or to the STAR file's folder: :func:`io.star.read_star`).
    meta : extra per-particle columns (arrays of length n) kept through conversions, e.g. ``rlnRandomSubset``.
    has_poses : False when the source holds no poses at all (a bare MRC stack: ``poses`` are zeros then).
    ctf_notes : what the reader assumed about the CTF, to be said once where the CTF is used or shown (e.g. RELION's
        default amplitude contrast for a file without one).
    ctf_refusal : why the CTF must not be applied (``--CTF`` is refused with this message), or None: CTF columns
        incomplete, images already multiplied by their CTF, a CTF scale factor we cannot apply.
    """

    images: ImageSource
    poses: np.ndarray
    apix_A: float = 1.0
    ctf: CTFParams | None = None
    image_refs: list[str] | None = None
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    has_poses: bool = True
    ctf_notes: list[str] = field(default_factory=list)
    ctf_refusal: str | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        self.poses = np.asarray(self.poses, dtype=np.float64)
        if self.poses.shape != (n, 5):
            raise ValueError(f"poses must have shape ({n}, 5) [{', '.join(POSE_COLUMNS)}], got {self.poses.shape}")
        if not np.all(np.isfinite(self.poses)):
            bad = int(np.nonzero(~np.all(np.isfinite(self.poses), axis=1))[0][0])
            raise ValueError(f"pose of particle {bad} is not finite: {self.poses[bad].tolist()}")
        if self.ctf is not None and len(self.ctf) != n:
            raise ValueError(f"{len(self.ctf)} CTF entries for {n} images")
        if self.image_refs is not None and len(self.image_refs) != n:
            raise ValueError(f"{len(self.image_refs)} image references for {n} images")
        if not (np.isfinite(self.apix_A) and self.apix_A > 0):
            raise ValueError(f"pixel size must be positive, got {self.apix_A}")
        for k, v in self.meta.items():
            if len(v) != n:
                raise ValueError(f"meta column {k!r} has {len(v)} values for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def box(self) -> int:
        return self.images.box

    def read_images(self, indices: Sequence[int] | np.ndarray | slice | None = None) -> np.ndarray:
        """float32 (k, box, box) images for the given indices (all when None)."""
        idx = np.arange(len(self))[indices if indices is not None else slice(None)]
        return self.images.read(np.atleast_1d(idx))

    def iter_chunks(self, chunk: int = 1024):
        """Yield (indices, float32 images) in chunks of at most ``chunk`` images: bounded memory for any n."""
        for start in range(0, len(self), chunk):
            idx = np.arange(start, min(start + chunk, len(self)))
            yield idx, self.images.read(idx)


def check_finite(images: np.ndarray, name: str, indices) -> None:
    """Raise ValueError naming the file and the first image that holds NaN or inf."""
    if images.size == 0:
        return
    ok = np.isfinite(images).reshape(len(images), -1).all(axis=1)
    if not ok.all():
        i = int(np.asarray(indices).reshape(-1)[np.nonzero(~ok)[0][0]])
        raise ValueError(f"{name}: image {i + 1} (1-based) contains NaN or inf pixels")


def check_refinable(stack: ParticleStack, *, ctf: bool, say=None) -> None:
    """Refuse, before any work, a stack that a local refinement cannot use as asked; say its reader's notes once.

    ValueError when the stack has no starting poses (a bare MRC stack), or when ``ctf`` (``--CTF``) is asked for
    but the CTF cannot be applied (``stack.ctf_refusal``: incomplete CTF columns, CTF-premultiplied images, a CTF
    scale factor other than 1). With ``ctf``, ``say`` (default: print on MPI rank 0 only) gets each of
    ``stack.ctf_notes``.
    """
    if not stack.has_poses:
        raise ValueError(f"{_source_name(stack)} holds images only, no poses: local refinement needs starting poses; "
                         "give a .star (RELION), .cs (cryoSPARC) or .hdf (EMAN2/SPARX) file with the particles' "
                         "poses from a 3D refinement or classification")
    if ctf and stack.ctf_refusal is not None:
        raise ValueError(f"--CTF: {stack.ctf_refusal}")
    if not ctf or not stack.ctf_notes:
        return
    if say is None:
        from ..parallel import world

        say = print if world().rank == 0 else (lambda text: None)
    for note in stack.ctf_notes:
        say(note)


def _source_name(stack: ParticleStack) -> str:
    name = getattr(stack.images, "name", None)
    return str(name) if name else "the stack"
