"""Direct Fourier inversion by nearest-neighbour insertion of central sections (SPARX nn4 / nn4_ctf), with symmetry.

This is the float64 numpy reference; the fast insertion kernel is tested against it, and MPI sums its
accumulators. It follows the SPARX reconstructors ``nn4`` (no CTF) and ``nn4_ctf`` (EMAN2 ``libEM/reconstructor.cpp``,
``libEM/sparx/emdata_sparx.cpp`` ``nn``/``nn_ctf_exists``/``symplane0``, ``padfft_slice``, ``circumfnn``; driven by
``sparx/libpy/reconstruction.py`` ``recons3d_4nn`` and ``recons3d_4nn_ctf``). Pose conventions are those of
:mod:`gpu_ali3d.geometry`; the CTF is :func:`gpu_ali3d.ctf.ctf_grid` (CTF(0) = +Q, as SPARX's ``Util::tf``).

What happens to each image (``padfft_slice``, then the reconstructor's ``insert_slice``):

1. Subtract the mean of the pixels outside the circle of radius M // 2 about the centre (M // 2, M // 2)
   (``average_circ_sub``: pixels with r^2 > (M // 2)^2).
2. Zero-pad to Np = npad * M with the image centre on the padded centre, 2-D FFT, and move the phase origin to
   the centre (``norm_pad``, ``do_fft``, ``center_origin_fft``): the transform is taken about the image centre.
3. Multiply by ``exp(-2 pi i k.s / Np)`` with s = (sx, sy) of the pose: translating the image by (+sx, +sy)
   centres it (``filter.shift`` by -t of the Transform).
4. With CTF: multiply by the CTF evaluated on the padded grid (frequency k / (Np apix_A)), weight CTF^2;
   without: weight 1.
5. For every symmetry mate ``R @ S`` of the pose (:func:`gpu_ali3d.symmetry.symmetry_rotations`, SPARX's
   ``Transform::get_sym_proj``) and every half-plane sample (kx, ky) with kx >= 0, kx^2 + ky^2 < Np^2 / 4 and not
   (kx = 0 and ky < 0): the 3-D position is ``q = (R S).T @ (kx, ky, 0)``; if q_x < 0 it is replaced by -q and
   the value by its complex conjugate (Friedel), then each coordinate is rounded to the nearest integer
   (``floor(q + 0.5)``) and the value and weight are added to that voxel of the half grid.

``finish`` (``nn4Reconstructor::finish`` / ``nn4_ctfReconstructor::finish``):

1. ``symplane0``: on the kx = 0 plane, every voxel (ky, kz) with |ky|, |kz| < Np / 2, other than the origin, is
   summed with the complex conjugate of its Friedel mate (-ky, -kz) (weights summed), so the plane is Hermitian.
2. Every voxel with weight w > 0 is multiplied by ``1 / (w + 1/snr)`` (snr=None: ``1 / w``, as ``nn4`` without
   an snr, the SPARX MPI path without CTF). Voxels with w = 0 are left as they are (they hold 0).
3. Only for nn4_ctf (``weighting`` on; ``nn4``'s copy of the code is switched off with ``&& false``): the
   neighbour-count correction multiplies each filled voxel by ``1 / (1 - alpha * s)``, where s sums
   ``a[10 - |i| - |j| - |k|]`` over empty neighbours in a 7^3 box, ``a[c] = exp(0.2 c)`` with ``a[9] = 0`` (so the
   six face neighbours never count), and ``alpha = (1 - 1/343) / sum of a over the whole box bar the centre``.
   SPARX's loop has two slips that decide which voxel is looked at, and they are reproduced here exactly as it
   runs (see :func:`_neighbour_weights`): the z neighbour is taken at ``cz + j`` instead of ``cz + k`` (so the
   box collapses onto the y = z diagonal plane, each voxel counted with the k-summed weight), and the Friedel
   flip for neighbours with x < 0 negates the loop variables in place, so only the first in-range (j, k) of each
   i is flipped in full.
4. Inverse 3-D FFT (normalised by 1 / Np^3), window the M^3 box about the centre (``depad``).
5. ``circumfnn``: divide each voxel by ``sinc(dx) sinc(dy) sinc(dz)`` with ``sinc(d) = sin(pi d / (4 M)) /
   (pi d / (4 M))`` (the 4 is SPARX's for any npad > 1; 1 for npad = 1), d the distance in voxels from the
   centre along each axis; subtract the mean of the voxels with (M/2 - 1)^2 <= r^2 <= (M/2)^2 from every voxel
   with r^2 <= (M/2)^2 and set the voxels outside to zero (M/2 is integer division).

Deliberate deviations from SPARX: arithmetic is float64 (SPARX: float32), so a sample whose rotated coordinate
lies within rounding error of a half-integer may land in the neighbouring voxel; the sums are formed per chunk of
images (bincount), not image by image, so they agree with an image-by-image sum to rounding. Npad * M must be even
(SPARX's odd-size paths are not reproduced; SPARX's local_ali3d always uses npad = 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy import ndimage

from .ctf import CTFParams, check_ctf_arguments, ctf_grid
from .geometry import as_poses, rotation_matrix
from .io.stack import StreamedImages, materialise
from .kernels import _check_array
from .symmetry import symmetry_rotations

#: The insertions (FourierAccumulator.insertion): SPARX's nearest neighbour on padded transforms, and trilinear
#: spreading of the images' own transforms.
INSERTIONS = ("trilinear", "nn4")
#: Side of the neighbour box of nn4_ctf's weighting correction, and the growth rate of its weights.
_WEIGHT_BOX = 7
_WEIGHT_RATE = 0.2


@dataclass
class FourierAccumulator:
    """The padded 3-D Fourier grid and weights of one reconstruction, before ``finish``.

    data : complex128 (Np, Np, Np // 2 + 1), Np = npad * M: the sum of (CTF *) image transforms, the layout of
        ``np.fft.rfftn`` of an (Np, Np, Np) array in numpy order (z, y, x): x (last axis) is the half axis kx = 0..Np/2,
        y and z are in FFT order (index i is frequency i for i < Np/2, i - Np above; origin at index 0), frequencies
        in cycles per padded box. The phase origin is the volume centre (voxel M // 2 of the final M^3 map).
    weights : float64, same shape: the sum of CTF^2 (or of 1 without CTF) per voxel.
    M : box of the images and of the map. npad : padding factor. sym : point group, applied at insertion.
    snr : the Wiener constant used by ``finish`` (1/snr added to the weights); None adds nothing.
    ctf : True once CTF-weighted images were inserted, False once images without CTF were, None while empty;
        it picks nn4_ctf's or nn4's finish.
    n_images : number of images inserted (each counted once, whatever the symmetry).
    insertion : "nn4" (SPARX: the padded image transforms, CTF on the padded grid, nearest voxel) or "trilinear"
        (the images' own M x M transforms with the CTF on that grid, spread over 8 voxels at npad times their
        frequency: :func:`insert_transforms_trilinear`); it also picks the finish's deapodisation.

    Accumulators with the same (M, npad, sym, snr) add exactly (:func:`add`): the MPI reduction is a plain sum of
    ``data`` and ``weights``.
    """

    data: np.ndarray
    weights: np.ndarray
    M: int
    npad: int
    sym: str
    snr: float | None
    ctf: bool | None = None
    n_images: int = 0
    insertion: str = "nn4"

    @property
    def Np(self) -> int:
        return self.M * self.npad


def new_accumulator(M: int, *, npad: int = 2, sym: str = "c1", snr: float | None = 1.0,
                    insertion: str = "nn4", xp=np) -> FourierAccumulator:
    """An empty accumulator for M^3 maps (FourierAccumulator for the layout and ``insertion``), its grids made by
    ``xp.zeros`` (numpy, or cupy: allocated on the device, nothing uploaded). Raises ValueError for bad values."""
    if insertion not in INSERTIONS:
        raise ValueError(f"insertion={insertion!r}; expected one of {INSERTIONS}")
    if not isinstance(M, (int, np.integer)) or M < 2:
        raise ValueError(f"M={M!r} must be an integer box size >= 2 pixels")
    if not isinstance(npad, (int, np.integer)) or npad < 1:
        raise ValueError(f"npad={npad!r} must be an integer >= 1 (SPARX uses 2)")
    if (M * npad) % 2:
        raise ValueError(f"npad * M = {npad} * {M} is odd; use an even npad (e.g. 2) for an odd box")
    if snr is not None and not (np.isfinite(snr) and snr > 0):
        raise ValueError(f"snr={snr!r} must be a positive number (or None for division by the weights alone)")
    symmetry_rotations(sym)  # validates the name
    n_p = int(M) * int(npad)
    shape = (n_p, n_p, n_p // 2 + 1)
    return FourierAccumulator(xp.zeros(shape, np.complex128), xp.zeros(shape, np.float64), int(M), int(npad),
                              str(sym), None if snr is None else float(snr), insertion=insertion)


def insert(acc: FourierAccumulator, images: np.ndarray, poses: np.ndarray, *, ctf: CTFParams | None = None,
           apix_A: float = 1.0, backend=None, deterministic: bool = True, scratch=None) -> None:
    """Insert images at their poses (and all symmetry mates) into ``acc``, in place (module docstring, steps 1-5).

    images : real (n, M, M), numpy order (y, x), centre (M // 2, M // 2); a host array, or (kernel path) already
    an array of the backend's device. poses : (n, 5) [phi, theta, psi, sx, sy]
    (:mod:`gpu_ali3d.geometry`). ctf : CTFParams of n particles (or one for all) for nn4_ctf insertion, or None.
    apix_A : pixel size in Angstrom, for the CTF only.
    backend : None for the numpy reference (:func:`insert_transforms`), or a :class:`gpu_ali3d.backend.Backend` for
        kernels/insert.cu (:func:`insert_transforms_kernel`; ``acc.data`` and ``acc.weights`` must then be arrays of
        that backend). Steps 1-4 run on the backend's arrays (:func:`slice_transforms`), in float32 for the kernel.
    deterministic : kernel path only: bitwise repeatable sums (:func:`insert_sums`); False uses plain atomics.
    scratch : kernel path only: zeroed grids to reuse across calls (:func:`insert_sums`).
    """
    images = _images_here(images, backend)
    if images.ndim != 3 or images.shape[1:] != (acc.M, acc.M):
        raise ValueError(f"images have shape {images.shape}; this accumulator takes (n, {acc.M}, {acc.M})")
    trilinear = acc.insertion == "trilinear"
    transforms, weights = slice_transforms(images, poses, npad=1 if trilinear else acc.npad, ctf=ctf,
                                           apix_A=apix_A, single=backend is not None,
                                           xp=np if backend is None else backend.xp)
    if backend is None:
        (insert_transforms_trilinear if trilinear else insert_transforms)(acc, transforms, weights, poses,
                                                                          ctf=ctf is not None)
    else:
        insert_transforms_kernel(acc, transforms, weights, poses, ctf=ctf is not None, backend=backend,
                                 deterministic=deterministic, scratch=scratch)


def slice_transforms(images: np.ndarray, poses: np.ndarray, *, npad: int = 2, ctf: CTFParams | None = None,
                     apix_A: float = 1.0, single: bool = False, xp=np):
    """The centred, shifted (and CTF-multiplied) padded image transforms that ``insert`` scatters (steps 1-4).

    Returns (transforms, weights): transforms complex128 (n, Np, Np // 2 + 1), ``np.fft.rfft2`` layout (ky rows in
    FFT order, kx = 0..Np/2 columns), phase origin at the image centre, cycles per padded box; weights float64
    (n or 1, Np, Np // 2 + 1) = CTF^2, or None without CTF (weight 1). npad = 1 gives the images' own M x M
    transforms (any M), which trilinear insertion reads.
    single : compute in float32 / complex64 (what kernels/insert.cu reads) after the mean subtraction, at twice
        the speed; the default float64 is the reference.
    xp : the array module the work runs on (numpy, or cupy and its FFTs: the images go up once, as float32 when
        single, and the transforms stay there); poses and CTF parameters are read on the host.
    """
    imgs = images if xp is not np and not isinstance(images, np.ndarray) else np.asarray(images)
    if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2]:
        raise ValueError(f"images must be square, shape (n, M, M); got {tuple(imgs.shape)}")
    if np.dtype(imgs.dtype).kind not in "fiu":
        raise TypeError(f"images must be a real array; got dtype {imgs.dtype}")
    n, m = imgs.shape[0], imgs.shape[1]
    p = as_poses(poses, n)
    if not isinstance(npad, (int, np.integer)) or npad < 1 or (npad > 1 and (m * npad) % 2):
        raise ValueError(f"npad={npad!r} must be an integer >= 1 with npad * M even (M={m}); SPARX uses 2")
    check_ctf_arguments(ctf, n, apix_A)
    n_p = m * npad
    c = m // 2
    real, cplx = (np.float32, np.complex64) if single else (np.float64, np.complex128)

    # 1. subtract the mean outside the circle of radius M // 2 (SPARX average_circ_sub), as a weighted sum (a
    # boolean index would make a GPU wait for the size of its result)
    axis = np.arange(m) - c
    outside = (axis[:, None] ** 2 + axis[None, :] ** 2 > c * c).astype(np.float64)
    imgs = xp.asarray(imgs, dtype=real).astype(np.float64)
    if outside.any():
        mean = (imgs * xp.asarray(outside)).sum(axis=(1, 2)) / float(outside.sum())
        imgs = imgs - mean[:, None, None]
    # 2. pad with the image centre at padded index 0 (wrapping), so the transform is taken about the centre
    padded = xp.zeros((n, n_p, n_p), real)
    padded[:, :m, :m] = imgs.astype(real)
    padded = xp.roll(padded, (-c, -c), axis=(1, 2))
    spectrum = _rfft2(xp, padded)
    # 3. the shift: translate by (+sx, +sy); separable, (n, Np, 1) then (n, 1, half), each made in float64
    ky = xp.asarray(np.fft.fftfreq(n_p, d=1.0 / n_p)[:, None])
    kx = xp.asarray(np.fft.rfftfreq(n_p, d=1.0 / n_p)[None, :])
    sx, sy = xp.asarray(p[:, 3, None, None]), xp.asarray(p[:, 4, None, None])
    spectrum *= xp.exp(-2j * np.pi * ky * sy / n_p).astype(cplx)
    spectrum *= xp.exp(-2j * np.pi * kx * sx / n_p).astype(cplx)
    # 4. the CTF, on the grid of the transforms (made on xp: only the shared grids and 7 numbers per image go up)
    if ctf is None:
        return spectrum, None
    ctf_values = ctf_grid(ctf, n_p, apix_A, half=True, dtype=real, xp=xp)
    spectrum *= ctf_values
    return spectrum, ctf_values * ctf_values


def _rfft2(xp, a):
    """rfft2 over the last two axes on xp: scipy's multi-threaded FFT on the host, xp.fft elsewhere."""
    if xp is np:
        return scipy.fft.rfft2(a, workers=-1)
    return xp.fft.rfft2(a)


def insert_transforms(acc: FourierAccumulator, transforms: np.ndarray, weights: np.ndarray | None,
                      poses: np.ndarray, *, ctf: bool) -> None:
    """Scatter prepared slice transforms into ``acc`` by nearest neighbour (step 5), in place.

    transforms : complex (n, Np, Np // 2 + 1) and weights : (n or 1, Np, Np // 2 + 1) or None, as returned by
    :func:`slice_transforms`; poses : (n, 5) (only the angles are read here; shifts are in the transforms).
    ctf : whether these are CTF-weighted (nn4_ctf) slices; it must agree with what ``acc`` already holds.
    """
    n_p = acc.Np
    half = n_p // 2 + 1
    # The half-plane samples that SPARX inserts: kx >= 0, kx^2 + ky^2 < Np^2/4, not (kx = 0 and ky < 0).
    begun = _begin_insert(acc, transforms, weights, poses, ctf, n_p)
    if begun is None:
        return
    p, kx_s, ky_s, values, w = begun

    rot = rotation_matrix(p[:, 0], p[:, 1], p[:, 2])                            # (n, 3, 3)
    shape, size = acc.data.shape, acc.data.size
    re, im = values.real, values.imag
    for op in symmetry_rotations(acc.sym):
        mate = rot @ op                                                         # (n, 3, 3): R @ S
        # q = (R S).T @ (kx, ky, 0), i.e. q_a = (R S)[0, a] kx + (R S)[1, a] ky; Friedel: q_x < 0 -> -q, conj
        qx, qy, qz = (mate[:, 0, a, None] * kx_s + mate[:, 1, a, None] * ky_s for a in range(3))   # (n, P) each
        sign = np.where(qx < 0.0, -1.0, 1.0)
        ix = np.floor(sign * qx + 0.5).astype(np.intp)
        iy = np.floor(sign * qy + 0.5).astype(np.intp) % n_p
        iz = np.floor(sign * qz + 0.5).astype(np.intp) % n_p
        flat = ((iz * n_p + iy) * half + ix).ravel()
        acc.data.real[...] += np.bincount(flat, re.ravel(), size).reshape(shape)
        acc.data.imag[...] += np.bincount(flat, (sign * im).ravel(), size).reshape(shape)
        counts = np.bincount(flat, None if weights is None else w.ravel(), size)
        acc.weights += counts.reshape(shape)


def insert_transforms_trilinear(acc: FourierAccumulator, transforms: np.ndarray, weights: np.ndarray | None,
                                poses: np.ndarray, *, ctf: bool) -> None:
    """Scatter the images' own transforms into ``acc`` by trilinear spreading, in place (acc.insertion "trilinear").

    transforms : complex (n, M, M // 2 + 1), weights : (n or 1, M, M // 2 + 1) CTF^2 or None: :func:`slice_transforms`
    with npad = 1, so the CTF is evaluated where the image was measured (on its own Fourier grid; a zero-padded
    image's in-between samples are interpolations of CTF x projection, which an analytic CTF evaluated there does
    not follow when the CTF oscillates faster than the grid). poses : (n, 5) (angles only).
    Each kept sample k (:func:`_kept_samples` of M) of each image and symmetry mate goes to q = npad (R S).T k
    (padded-grid units), Friedel-flipped to q_x >= 0 as in :func:`insert_transforms`, and adds t * value and
    t * weight to the 8 voxels i = floor(q) + (0 or 1 per axis), t = prod_a (1 - |q_a - i_a|).
    """
    n_p, m = acc.Np, acc.M
    half = n_p // 2 + 1
    begun = _begin_insert(acc, transforms, weights, poses, ctf, m)
    if begun is None:
        return
    p, kx_s, ky_s, values, w = begun
    w = np.ones(values.shape) if w is None else w
    rot = rotation_matrix(p[:, 0], p[:, 1], p[:, 2])
    shape, size = acc.data.shape, acc.data.size
    scale = float(acc.npad)
    for op in symmetry_rotations(acc.sym):
        mate = rot @ op
        qx, qy, qz = ((mate[:, 0, a, None] * kx_s + mate[:, 1, a, None] * ky_s) * scale for a in range(3))
        sign = np.where(qx < 0.0, -1.0, 1.0)
        qx, qy, qz = sign * qx, sign * qy, sign * qz
        re, im = values.real, sign * values.imag
        x0, y0, z0 = (np.floor(q).astype(np.intp) for q in (qx, qy, qz))
        fx, fy, fz = qx - x0, qy - y0, qz - z0
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    t = ((fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy)) * (fz if dz else 1.0 - fz)
                    flat = ((((z0 + dz) % n_p) * n_p + (y0 + dy) % n_p) * half + x0 + dx).ravel()
                    acc.data.real[...] += np.bincount(flat, (t * re).ravel(), size).reshape(shape)
                    acc.data.imag[...] += np.bincount(flat, (t * im).ravel(), size).reshape(shape)
                    acc.weights += np.bincount(flat, (t * w).ravel(), size).reshape(shape)


def insert_transforms_kernel(acc: FourierAccumulator, transforms, weights, poses: np.ndarray, *, ctf: bool,
                             backend, deterministic: bool = True, scratch=None) -> None:
    """:func:`insert_transforms` (or :func:`insert_transforms_trilinear`, by ``acc.insertion``) through
    kernels/insert.cu, in place: the same voxels, the same sums to float rounding.

    transforms, weights, poses, ctf : as :func:`insert_transforms` (numpy or backend arrays); the transforms are
    converted to complex64 and the weights to float32 (the kernel's input precision; sums are float64).
    acc.data, acc.weights : arrays of ``backend`` (on the CPU backend the numpy arrays themselves).
    deterministic, scratch : see :func:`insert_sums`.
    """
    xp = backend.xp
    n, p = _check_slices(acc, transforms, weights, poses, ctf)
    acc.ctf = ctf
    acc.n_images += n
    if n == 0:
        return
    ops = symmetry_rotations(acc.sym)
    rot = rotation_matrix(p[:, 0], p[:, 1], p[:, 2])                            # (n, 3, 3)
    mates = np.stack([rot @ op for op in ops], axis=1)                          # (n, k, 3, 3): R @ S, as the reference
    trilinear = acc.insertion == "trilinear"
    keep, _, _ = _kept_samples(acc.M if trilinear else acc.Np)
    samples = np.flatnonzero(keep).astype(np.int32)
    insert_sums(backend, xp.ascontiguousarray(xp.asarray(transforms, dtype=np.complex64)),
                None if weights is None else xp.ascontiguousarray(xp.asarray(weights, dtype=np.float32)),
                xp.asarray(mates), samples, acc.data, acc.weights, deterministic=deterministic,
                scratch=scratch, trilinear=trilinear)


def new_scratch(backend, n_p: int):
    """The zeroed fixed-point grid of :func:`insert_sums` (deterministic mode), to reuse over many calls: float64
    (Np, Np, Np // 2 + 1, 3), each voxel's value (re, im) and weight side by side (kernels/insert.cu)."""
    return backend.xp.zeros((n_p, n_p, n_p // 2 + 1, 3), np.float64)


def insert_sums(backend, transforms, weights, mates, samples, data, wsum, *, deterministic: bool = True,
                scratch=None, trilinear: bool = False) -> None:
    """Launch kernels/insert.cu: add every kept sample of every image at every symmetry mate to ``data``/``wsum``.

    transforms : complex64 (n, L, L // 2 + 1), C-contiguous backend array (:func:`slice_transforms` layout); L = Np
    for nearest neighbour, L = M (npad = 1 transforms) with ``trilinear``, where L must divide Np.
    weights : float32 (n or 1, L, L // 2 + 1) CTF^2, or None (weight 1). mates : float64 (n, k, 3, 3), R @ S per
    image and symmetry operator. samples : int32 (S,) host (numpy) array, flat indices of the kept half-plane
    samples of an L plane (:func:`_kept_samples`): they are known on the host, checked there and uploaded once. data : complex128 (Np, Np, Np // 2 + 1), wsum : float64, same shape
    (:class:`FourierAccumulator` layout), added to in place.
    trilinear : spread each sample at (Np / L) (R S).T k over its 8 voxels (:func:`insert_transforms_trilinear`);
        False: the nearest voxel (:func:`insert_transforms`, L = Np).
    deterministic : True: fixed-point sums, exact in float64 and so independent of the order of the additions
        (bitwise repeatable on any number of threads, CPU or GPU; kernels/insert.cu explains the scales); it costs a
        zeroed scratch grid of the accumulator's size and one pass over it. False: float64 atomics straight into the
        accumulator (the last bits follow thread timing).
    scratch : the grid of :func:`new_scratch`, all zero, to use instead of a new one (it is left all zero
        again); None allocates one for this call.
    """
    xp = backend.xp
    n = transforms.shape[0] if getattr(transforms, "ndim", 0) == 3 else -1
    n_p = data.shape[0] if getattr(data, "ndim", 0) == 3 else -1
    half = n_p // 2 + 1
    _check_array("data", data, np.complex128, (n_p, n_p, half), xp)
    _check_array("wsum", wsum, np.float64, (n_p, n_p, half), xp)
    if n_p < 2 or n_p % 2:
        raise ValueError(f"the padded grid side Np={n_p} must be even and >= 2")
    side = transforms.shape[1] if (trilinear and getattr(transforms, "ndim", 0) == 3) else n_p
    if side < 2 or n_p % side:
        raise ValueError(f"trilinear insertion of {side}-pixel planes into an Np={n_p} grid: the planes' side must "
                         "divide Np")
    plane = (side, side // 2 + 1)
    _check_array("transforms", transforms, np.complex64, (n,) + plane, xp)
    n_w = weights.shape[0] if getattr(weights, "ndim", 0) == 3 else -1
    if weights is not None:
        _check_array("weights", weights, np.float32, (n_w if n_w in (1, n) else n,) + plane, xp)
    k = mates.shape[1] if getattr(mates, "ndim", 0) == 4 else -1
    _check_array("mates", mates, np.float64, (n, k, 3, 3), xp)
    s = samples.shape[0] if getattr(samples, "ndim", 0) == 1 else -1
    _check_array("samples", samples, np.int32, (s,), np)
    if s and (int(samples.min()) < 0 or int(samples.max()) >= plane[0] * plane[1]):
        raise ValueError(f"samples must index one {plane} plane; got {int(samples.min())}..{int(samples.max())}")
    samples_dev = xp.asarray(samples)
    if n == 0 or k == 0 or s == 0:
        return
    has_w = weights is not None
    w_arg = weights if has_w else xp.zeros(1, np.float32)                     # not read when has_weights = 0
    w_stride = 0 if (not has_w or n_w == 1) else plane[0] * plane[1]

    def launch(out_data, out_w, scale_v, scale_w, mode):
        backend.kernels.launch("insert", "insert", n * k, [
            transforms, np.int64(n), np.int32(side), np.int32(n_p), np.float64(n_p // side), samples_dev, np.int32(s),
            w_arg, np.int64(w_stride), np.int32(has_w), mates, np.int32(k), out_data, out_w, scale_v, scale_w,
            np.int32(mode), np.int32(trilinear)])

    if not deterministic:
        unused = xp.ones(1, np.float64)
        launch(data, wsum, unused, unused, 0)
        return
    scale_v, scale_w = _shell_scales(xp, transforms, weights, samples, n_p, k, side=side,
                                     reach=2 if trilinear else 1, samples_dev=samples_dev)
    if scratch is None:
        scratch = new_scratch(backend, n_p)
    else:
        _check_array("scratch", scratch, np.float64, (n_p, n_p, half, 3), xp)
    launch(scratch, scratch, scale_v, scale_w, 1)                 # mode 1 reads no separate weight grid
    backend.kernels.launch("insert", "insert_unscale", n_p * n_p, [
        scratch, np.int32(n_p), scale_v, scale_w, data, wsum])


def add(acc_a: FourierAccumulator, acc_b: FourierAccumulator) -> FourierAccumulator:
    """A new accumulator holding the sum of two (half sets, MPI ranks). They must share M, npad, sym and snr."""
    _check_addable(acc_a, acc_b)
    return FourierAccumulator(acc_a.data + acc_b.data, acc_a.weights + acc_b.weights, acc_a.M, acc_a.npad,
                              acc_a.sym, acc_a.snr, acc_a.ctf if acc_a.ctf is not None else acc_b.ctf,
                              acc_a.n_images + acc_b.n_images, acc_a.insertion)


def _check_addable(acc_a: FourierAccumulator, acc_b: FourierAccumulator) -> None:
    """ValueError unless the two accumulators can be summed (:func:`add`)."""
    for name in ("M", "npad", "sym", "snr", "insertion"):
        if getattr(acc_a, name) != getattr(acc_b, name):
            raise ValueError(f"cannot add accumulators with different {name}: "
                             f"{getattr(acc_a, name)!r} and {getattr(acc_b, name)!r}")
    if None not in (acc_a.ctf, acc_b.ctf) and acc_a.ctf != acc_b.ctf:
        raise ValueError("cannot add an accumulator of CTF-weighted images to one without CTF")


def finish(acc: FourierAccumulator, *, plus: FourierAccumulator | None = None, weighting: bool | None = None,
           regularisation: np.ndarray | None = None, backend=None) -> np.ndarray:
    """The real-space map from an accumulator (module docstring, finish steps 1-5); ``acc`` is not changed.

    plus : a second accumulator: the map of their sum, ``finish(add(acc, plus))`` (the full map from the half sets).
        With a backend, steps 1-2 read both grids in one pass of kernels/finish.cu and the sum is never formed.
    weighting : nn4_ctf's neighbour-count correction; None (default) does as SPARX: on for CTF-weighted data
        inserted by nearest neighbour (nn4_ctf), off otherwise (nn4, and trilinear insertion).
    regularisation : None adds SPARX's constant 1 / snr to the weights (``acc.snr``; for trilinear insertion
        1 / (snr npad^2), as its weights per voxel are about 1 / npad^2 of nn4's: each of the image's M^2 samples
        spreads a total weight of 1, where nn4 inserts (npad M)^2); or float64 (n_shells,) per-shell terms added to
        the weights of the voxels with floor(|i|) = shell (:func:`wiener_regularisation`).
    Trilinear insertion is deapodised by dividing the map by sinc^2(pi d / Np) along each axis (the transform of the
    spreading kernel; d voxels from the centre), then centred and masked as ``circumfnn`` does.
    backend : None when ``acc`` holds host arrays; else the Backend whose device holds them: the finish runs there
        (nn4_ctf's neighbour weighting excepted: that accumulator is copied to the host first) and only the M^3 map
        comes back.
    The inverse FFT stays in float64: the deterministic insertion makes the sums over MPI ranks equal a serial
    run's to ~1e-11, and float32 rounding here would turn that into different poses.
    Returns float64 (M, M, M) numpy array, numpy order (z, y, x), centre voxel M // 2, zero outside radius M // 2.
    """
    trilinear = acc.insertion == "trilinear"
    if plus is not None:
        _check_addable(acc, plus)
    if weighting is None:
        ctf = acc.ctf if plus is None or acc.ctf is not None else plus.ctf      # as add() sets it
        weighting = bool(ctf) and not trilinear
    if plus is not None and (weighting or backend is None):     # the reference: form the sum
        acc, plus = add(acc, plus), None
    xp = np if backend is None else backend.xp
    if weighting and xp is not np:        # the neighbour-count correction is written for the host (scipy.ndimage)
        host = FourierAccumulator(backend.to_host(acc.data), backend.to_host(acc.weights), acc.M, acc.npad, acc.sym,
                                  acc.snr, acc.ctf, acc.n_images, acc.insertion)
        return finish(host, weighting=weighting, regularisation=regularisation)
    n_p, m = acc.Np, acc.M
    const = 0.0 if acc.snr is None else 1.0 / acc.snr / (acc.npad ** 2 if trilinear else 1)
    if weighting:                            # nn4_ctf: its neighbour count reads the whole symmetrised grid
        osnr = const if regularisation is None else np.asarray(regularisation, np.float64)[_voxel_shells(n_p)]
        data, weights = acc.data.copy(), acc.weights.copy()
        _symplane0(data, weights, xp)
        filled = weights > 0
        scale = xp.where(filled, 1.0 / xp.where(filled, weights + osnr, 1.0), 1.0)
        scale *= np.where(filled, _neighbour_weights(weights), 1.0)
        data *= scale
    elif backend is not None:
        data = _normalise_kernel(acc, plus, const, regularisation, backend)
    else:
        osnr = const if regularisation is None else np.asarray(regularisation, np.float64)[_voxel_shells(n_p)]
        # Only the kx = 0 plane changes in symplane0: symmetrise copies of it, not of the grids. Voxels with weight
        # 0 are left as they are (they hold 0): 1 / where(w > 0, w + 1/snr, 1), not a boolean index
        data0, weights0 = acc.data[:, :, :1].copy(), acc.weights[:, :, :1].copy()
        _symplane0(data0, weights0, xp)
        osnr0 = osnr if np.ndim(osnr) == 0 else osnr[:, :, :1]
        data = acc.data / xp.where(acc.weights > 0, acc.weights + osnr, 1.0)
        data[:, :, :1] = data0 / xp.where(weights0 > 0, weights0 + osnr0, 1.0)
    vol = _inverse_centre_window(data, n_p, m, xp)
    del data
    if trilinear:
        d = np.abs(np.arange(m) - m // 2) * (np.pi / n_p)
        sinc2 = xp.asarray(np.where(d > 0, np.sin(d) / np.where(d > 0, d, 1.0), 1.0) ** 2)
        vol = vol / (sinc2[:, None, None] * sinc2[None, :, None] * sinc2[None, None, :])
        vol = _circumfnn(vol, acc.npad, deapodise=False, xp=xp)
    else:
        vol = _circumfnn(vol, acc.npad, xp=xp)
    return vol if xp is np else backend.to_host(vol)


def _normalise_kernel(acc: FourierAccumulator, plus: FourierAccumulator | None, const: float,
                      regularisation: np.ndarray | None, backend):
    """Finish steps 1-2 of ``acc`` (+ ``plus``) on the backend's device: kernels/finish.cu divides every voxel by its
    weight plus the Wiener term (``const``, or ``regularisation`` per shell) in one pass, then the kx = 0 plane is
    redone from symmetrised copies of it, as the reference does. Returns complex128 (Np, Np, Np // 2 + 1) xp array,
    bitwise the reference's (kernels/finish.cu)."""
    xp, n_p = backend.xp, acc.Np
    half = n_p // 2 + 1
    parts = [acc] if plus is None else [acc, plus]
    for a in parts:
        _check_array("data", a.data, np.complex128, (n_p, n_p, half), xp)
        _check_array("weights", a.weights, np.float64, (n_p, n_p, half), xp)
    other = parts[-1]
    per_shell = regularisation is not None
    lam = xp.asarray(np.asarray(regularisation if per_shell else [0.0], np.float64))
    out = xp.empty((n_p, n_p, half), np.complex128)
    backend.kernels.launch("finish", "finish", n_p * n_p, [
        acc.data, acc.weights, other.data, other.weights, np.int32(plus is not None), np.int32(n_p),
        np.float64(const), lam, np.int32(per_shell), out])
    if plus is None:
        data0, weights0 = acc.data[:, :, :1].copy(), acc.weights[:, :, :1].copy()
    else:                                      # the plane of add(acc, plus)
        data0, weights0 = acc.data[:, :, :1] + plus.data[:, :, :1], acc.weights[:, :, :1] + plus.weights[:, :, :1]
    _symplane0(data0, weights0, xp)
    lam0 = lam[_voxel_shells(n_p, xp, x_count=1)] if per_shell else const
    out[:, :, :1] = data0 / xp.where(weights0 > 0, weights0 + lam0, 1.0)
    return out


#: snr_from_score's bounds: SPARX's default constant below, and a cap that keeps 1/snr above rounding.
MEASURED_SNR_RANGE = (1.0, 1000.0)


def snr_from_score(mean_cc: float | None) -> float:
    """The reconstruction's SNR (the Wiener constant's, :func:`finish`) measured from an alignment's mean score.

    mean_cc : the mean over the images of the objective's normalised correlation of each image with the
    reference's CTF-weighted section at its refined pose, within the objective's band (None: no alignment yet).
    For an image x = s + n and a section proportional to s, cc^2 = S / (S + N), so SNR = cc^2 / (1 - cc^2): the
    images' SNR in the band, underestimated where the reference itself is in error. Returned within
    :data:`MEASURED_SNR_RANGE`: SPARX's 1 where the measure is lower (trusting lower values measured worse:
    1,000 GPCR particles at SNR 0.05, 5 iterations, 1.40 deg with snr 0.1 against 1.28 with 1) and at most 1000.
    """
    low, high = MEASURED_SNR_RANGE
    if mean_cc is None or not np.isfinite(mean_cc) or mean_cc <= 0:
        return low
    cc2 = min(float(mean_cc), 1.0) ** 2
    snr = cc2 / (1.0 - cc2) if cc2 < 1.0 else high
    return min(high, max(low, snr))


def wiener_regularisation(acc_a: FourierAccumulator, acc_b: FourierAccumulator, *,
                          fsc_range: tuple[float, float] = (1e-3, 0.999999), backend=None) -> np.ndarray:
    """Per-shell Wiener terms from the data: what :func:`finish` adds to the weights instead of SPARX's 1 / snr.

    acc_a, acc_b : the two half-set accumulators (same M, npad, sym, insertion). In each shell sh = floor(|i|) of
    the padded grid, the FSC of the two unregularised half transforms (data / weights, over the voxels filled in
    both) gives the half maps' SSNR = FSC / (1 - FSC), and the term is mean(half weights) / SSNR: the Wiener
    estimate sum CTF X / (sum CTF^2 + sigma^2 / |V|^2) with sigma^2 / |V|^2 = mean weight / SSNR. The same term
    suits the full map (its weights and its SSNR are both twice a half map's). The FSC is clipped to ``fsc_range``,
    so a shell without signal is damped hard but finitely, and nearly noise-free data are hardly regularised (the
    role of RELION's tau^2). backend : as :func:`finish`. Returns float64 (n_shells,) numpy, the shells of
    :func:`_voxel_shells`.
    """
    for name in ("M", "npad", "sym", "insertion"):
        if getattr(acc_a, name) != getattr(acc_b, name):
            raise ValueError(f"half-set accumulators with different {name}: {getattr(acc_a, name)!r} and "
                             f"{getattr(acc_b, name)!r}")
    xp = np if backend is None else backend.xp
    shells = _voxel_shells(acc_a.Np, xp)
    n_shells = math.isqrt(3 * (acc_a.Np // 2) ** 2) + 1
    both = (acc_a.weights > 0) & (acc_b.weights > 0)
    va = xp.where(both, acc_a.data / xp.where(both, acc_a.weights, 1.0), 0.0)      # 0 outside `both`
    vb = xp.where(both, acc_b.data / xp.where(both, acc_b.weights, 1.0), 0.0)
    sh = shells.ravel()

    def per_shell(values):                      # one sum per shell, back on the host (n_shells numbers)
        out = xp.bincount(sh, weights=values.ravel(), minlength=n_shells)
        return np.asarray(out if xp is np else backend.to_host(out))[:n_shells]

    cross = per_shell((va * xp.conj(vb)).real)
    pa, pb = per_shell(xp.abs(va) ** 2), per_shell(xp.abs(vb) ** 2)
    denominator = np.sqrt(pa * pb)
    fsc = np.where(denominator > 0, cross / np.where(denominator > 0, denominator, 1.0), 0.0)
    fsc = np.clip(fsc, *fsc_range)
    count = per_shell(both.astype(np.float64))
    mean_w = per_shell(xp.where(both, 0.5 * (acc_a.weights + acc_b.weights), 0.0)) / np.maximum(count, 1)
    return mean_w * (1.0 - fsc) / fsc


def reconstruct(images: np.ndarray, poses: np.ndarray, *, ctf: CTFParams | None = None, apix_A: float = 1.0,
                snr: float | None = 1.0, sym: str = "c1", npad: int = 2, chunk: int = 256,
                backend=None, insertion: str = "nn4") -> np.ndarray:
    """nn4 (ctf None) or nn4_ctf reconstruction of images at poses: float64 (M, M, M), see :func:`finish`.

    Images go through :func:`insert` ``chunk`` at a time, so memory stays bounded for any number of images.
    backend : None for the numpy reference insertion, or a Backend for kernels/insert.cu (deterministic mode); the
    accumulator then lives on that backend until ``finish``, which runs on the host.
    """
    acc = _accumulate(images, poses, np.arange(len(images)), ctf=ctf, apix_A=apix_A, snr=snr, sym=sym, npad=npad,
                      chunk=chunk, backend=backend, insertion=insertion)
    return finish(acc)


def reconstruct_halves(images: np.ndarray, poses: np.ndarray, *, half: np.ndarray | None = None,
                       ctf: CTFParams | None = None, apix_A: float = 1.0, snr: float | None = 1.0, sym: str = "c1",
                       npad: int = 2, chunk: int = 256, backend=None,
                       insertion: str = "nn4") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two half maps and the full map, each float64 (M, M, M): (even, odd, full).

    half : int array (n,) of 0 (first, "even" half) and 1 (second, "odd" half), e.g. rlnRandomSubset - 1; None
        splits by image index parity as SPARX's local_ali3d does (images 0, 2, 4, ... and 1, 3, 5, ...).
    The full map is finished from the sum of the two half accumulators, which equals a reconstruction from all
    images up to float rounding. backend : as :func:`reconstruct`.
    """
    accs = accumulate_halves(images, poses, half=half, ctf=ctf, apix_A=apix_A, snr=snr, sym=sym, npad=npad,
                             chunk=chunk, backend=backend, insertion=insertion)
    return finish(accs[0]), finish(accs[1]), finish(add(accs[0], accs[1]))


def accumulate_halves(images: np.ndarray, poses: np.ndarray, *, half: np.ndarray | None = None,
                      ctf: CTFParams | None = None, apix_A: float = 1.0, snr: float | None = 1.0, sym: str = "c1",
                      npad: int = 2, chunk: int = 256, backend=None, insertion: str = "nn4",
                      on_device: bool = False, scratch=None) -> tuple[FourierAccumulator, FourierAccumulator]:
    """The two half-set accumulators of :func:`reconstruct_halves`, before ``finish``: what an MPI rank computes
    from its own particles (``half`` is then its slice of the global assignment) and
    :func:`gpu_ali3d.parallel.reduce_accumulator` sums over ranks. Arguments as :func:`reconstruct_halves`;
    on_device : keep the grids on the backend's device (for :func:`finish` there) instead of host arrays.
    scratch : kernel path: the zeroed grid of :func:`new_scratch` to use (a caller that reconstructs every
    iteration keeps one, sparing the allocation and first-touch zeroing of a grid per call); None makes one,
    shared by both halves."""
    n = len(images)
    if half is None:
        half = np.arange(n) % 2
    half = np.asarray(half)
    if half.shape != (n,) or not np.isin(half, (0, 1)).all():
        raise ValueError(f"half must be an array of {n} values, each 0 or 1; got shape {half.shape} with values "
                         f"{np.unique(half)[:5]}")
    if backend is not None and scratch is None:
        scratch = new_scratch(backend, npad * np.shape(images)[-1])
    return tuple(_accumulate(images, poses, np.nonzero(half == h)[0], ctf=ctf, apix_A=apix_A, snr=snr, sym=sym,
                             npad=npad, chunk=chunk, backend=backend, insertion=insertion, on_device=on_device,
                             scratch=scratch)
                 for h in (0, 1))


# ----------------------------------------------------------------------------------------------- helpers
#: Bytes of slice transforms (complex64 data and float32 CTF^2) one insertion call may hold, per image set: the
#: fast path inserts as many images per call as fit (each call ends with a pass over the whole grid).
INSERT_BATCH_BYTES = 256 << 20


def insert_chunk(M: int, npad: int, insertion: str, *, budget: int = INSERT_BATCH_BYTES) -> int:
    """Images per insertion call within ``budget`` bytes of slice transforms: the M x M planes (trilinear) or the
    npad M x npad M ones (nn4), 12 bytes per half-plane sample (complex64 value, float32 CTF^2); at least 256."""
    side = M if insertion == "trilinear" else M * npad
    return max(256, budget // (12 * side * (side // 2 + 1)))


def _accumulate(images, poses, which: np.ndarray, *, ctf, apix_A, snr, sym, npad, chunk,
                backend=None, insertion: str = "nn4", on_device: bool = False, scratch=None) -> FourierAccumulator:
    images = _images_here(images, backend)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be square, shape (n, M, M); got {tuple(images.shape)}")
    resident = backend is not None and backend.xp is not np and isinstance(images, backend.xp.ndarray)
    poses = as_poses(poses, len(images))
    check_ctf_arguments(ctf, len(images), apix_A)
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be a positive number of images")
    acc = new_accumulator(images.shape[1], npad=npad, sym=sym, snr=snr, insertion=insertion,
                          xp=np if backend is None else backend.xp)
    if backend is not None and scratch is None:  # accumulate on the backend's device
        scratch = new_scratch(backend, acc.Np) if len(which) > chunk else None   # shared by the chunks
    for start in range(0, len(which), chunk):
        sel = which[start:start + chunk]
        part_ctf = None if ctf is None else (ctf if len(ctf) == 1 else ctf[sel])
        chunk_images = images[backend.xp.asarray(sel)] if resident else materialise(images[sel])   # read now
        insert(acc, chunk_images, poses[sel], ctf=part_ctf, apix_A=apix_A, backend=backend, scratch=scratch)
    if backend is not None and not on_device:
        acc.data, acc.weights = backend.to_host(acc.data), backend.to_host(acc.weights)
    if ctf is not None:
        acc.ctf = True  # an empty half of a CTF data set still finishes as nn4_ctf
    return acc


def _images_here(images, backend):
    """Images as given when they are already an array of the backend's device (a GPU run keeps them there) or
    streamed (io.stack.StreamedImages: each chunk is read as it is inserted), else as a host numpy array (uploaded
    by :func:`slice_transforms`)."""
    if isinstance(images, StreamedImages):
        return images
    if backend is not None and backend.xp is not np and isinstance(images, backend.xp.ndarray):
        return images
    return np.asarray(images)


def _check_slices(acc, transforms, weights, poses, ctf) -> tuple[int, np.ndarray]:
    """The shape and CTF checks of :func:`insert_transforms` (both paths). Returns (n, poses as float64 (n, 5))."""
    n_p = acc.M if acc.insertion == "trilinear" else acc.Np      # the side of the inserted planes
    half = n_p // 2 + 1
    if transforms.ndim != 3 or transforms.shape[1:] != (n_p, half):
        raise ValueError(f"transforms have shape {transforms.shape}; expected (n, {n_p}, {half}) for M={acc.M}, "
                         f"npad={acc.npad}, insertion {acc.insertion}")
    n = transforms.shape[0]
    p = as_poses(poses, n)
    if ctf != (weights is not None):
        raise ValueError(f"ctf={ctf} but weights are {'given' if weights is not None else 'None'}; CTF-weighted "
                         "slices come with their CTF^2 weights, CTF-free ones with None")
    if weights is not None and (weights.ndim != 3 or weights.shape[0] not in (1, n)
                                or weights.shape[1:] != transforms.shape[1:]):
        raise ValueError(f"weights have shape {weights.shape}; expected (1 or {n}, {n_p}, {half})")
    if acc.ctf is not None and acc.ctf != ctf:
        raise ValueError("cannot mix images with and without CTF in one accumulator "
                         f"(it holds {'CTF-weighted' if acc.ctf else 'CTF-free'} data)")
    return n, p


def _begin_insert(acc, transforms, weights, poses, ctf, side: int):
    """The common start of the numpy insertions: check the slices, count the images into ``acc``, and pick the
    kept samples of a side x side plane (:func:`_kept_samples`). Returns None when there are no images, else
    (poses float64 (n, 5), kx, ky float64 (P,), values (n, P), weights (n, P) or None)."""
    n, p = _check_slices(acc, transforms, weights, poses, ctf)
    acc.ctf = ctf
    acc.n_images += n
    if n == 0:
        return None
    keep, kx, ky = _kept_samples(side)
    values = transforms[:, keep]
    w = None if weights is None else np.broadcast_to(weights[:, keep], values.shape)
    return p, kx[keep].astype(np.float64), ky[keep].astype(np.float64), values, w


def _kept_samples(n_p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SPARX's inserted half-plane samples of an (Np, Np // 2 + 1) rfft2 plane: kx >= 0, kx^2 + ky^2 < Np^2/4, not
    (kx = 0 and ky < 0). Returns (keep, kx, ky): bool mask and int64 frequencies, each (Np, Np // 2 + 1)."""
    half = n_p // 2 + 1
    ky = np.fft.fftfreq(n_p, d=1.0 / n_p).astype(np.int64)[:, None] * np.ones((1, half), np.int64)
    kx = np.arange(half, dtype=np.int64)[None, :] * np.ones((n_p, 1), np.int64)
    keep = (4 * (kx * kx + ky * ky) < n_p * n_p) & ~((kx == 0) & (ky < 0))
    return keep, kx, ky


def _shell_scales(xp, transforms, weights, samples, n_p: int, n_mates: int, *, side: int | None = None,
                  reach: int = 1, samples_dev=None):
    """The power-of-two scales of the deterministic insert, per shell sh = floor(|i|) of voxel coordinates i.

    A sample at q (3-D grid units: q = (Np / side) k for a sample k of a side x side plane) reaches a voxel i with
    | |i| - |q| | < sqrt(3)/2 by nearest neighbour (reach 1) and < sqrt(3) by trilinear spreading (reach 2), so the
    voxels of shell sh only receive samples with floor(|q|) in sh - reach .. sh + reach; B[sh] = n_mates * (sum of
    |value| over those samples of every image) bounds the sum of |contributions| to any voxel of the shell (each
    trilinear contribution is the value times a weight <= 1), and scale = 2^(51 - e) with B < 2^e keeps every
    fixed-point partial sum below 2^52 (exact in float64). samples : int32 host array; samples_dev : its copy on
    xp's device (default: uploaded here). Returns (scale_v, scale_w): float64 (n_shells,) backend arrays.
    """
    side = n_p if side is None else side
    n = transforms.shape[0]
    half = side // 2 + 1
    n_shells = math.isqrt(3 * (n_p // 2) ** 2) + 2
    # The per-sample sums of |value| and |weight| are made on the device and come back as one (2, S) array (one
    # sync); the shells of the samples and the bounds are host work on n_shells numbers; the scales go up.
    samples_dev = xp.asarray(samples) if samples_dev is None else samples_dev
    _, kx, ky = _kept_samples(side)
    factor = (n_p // side) ** 2
    r2 = (kx * kx + ky * ky).ravel()[samples] * factor                        # (S,) int64 |q|^2
    bins = np.floor(np.sqrt(r2.astype(np.float64))).astype(np.int64)           # floor(|q|), made exact:
    bins -= (bins * bins > r2)
    bins += ((bins + 1) * (bins + 1) <= r2)
    values = transforms.reshape(n, side * half)[:, samples_dev]
    abs_v = xp.abs(values.astype(np.complex128)).sum(axis=0)                  # (S,) float64
    if weights is None:
        abs_w = xp.full(samples.shape[0], float(n), np.float64)
    else:
        w = xp.abs(weights.reshape(weights.shape[0], side * half)[:, samples_dev].astype(np.float64)).sum(axis=0)
        abs_w = w * (n if weights.shape[0] == 1 else 1)
    both = xp.stack([abs_v, abs_w])
    sums = both if xp is np else xp.asnumpy(both)

    def scales(per_sample):
        a = np.zeros(n_shells + 2 * reach, np.float64)
        a[reach:n_shells + reach] = np.bincount(bins, weights=per_sample, minlength=n_shells)[:n_shells] * n_mates
        bound = a[:n_shells].copy()                                            # B[sh] = A[sh-reach] + .. + A[sh+reach]
        for j in range(1, 2 * reach + 1):
            bound += a[j:j + n_shells]
        if not np.isfinite(bound).all():
            raise ValueError("the transforms or weights hold NaN or infinite values; check the input images and CTF")
        _, e = np.frexp(bound)                                                 # bound < 2^e
        e = np.where(bound > 0, np.clip(51 - e, -1000, 1000), 0)
        return xp.asarray(np.ascontiguousarray(np.ldexp(np.ones(n_shells), e.astype(np.int32))))

    return scales(sums[0]), scales(sums[1])


def _signed(n: int) -> np.ndarray:
    """Signed frequency of each FFT-order index as SPARX's finish numbers them: 0..n/2-1, then -n/2..-1."""
    i = np.arange(n)
    return np.where(i < n // 2, i, i - n)


def _symplane0(data, weights, xp=np) -> None:
    """SPARX ``symplane0``: make the kx = 0 plane Hermitian by summing each voxel with its Friedel mate, in place.

    Only voxels with |ky|, |kz| < Np/2 (not the Nyquist row/column) and not the origin take part. data, weights:
    arrays of xp.
    """
    n_p = data.shape[0]
    mate = xp.asarray((-np.arange(n_p)) % n_p)
    plane, wplane = data[:, :, 0], weights[:, :, 0]
    summed = plane + xp.conj(xp.take(xp.take(plane, mate, axis=0), mate, axis=1))
    wsummed = wplane + xp.take(xp.take(wplane, mate, axis=0), mate, axis=1)
    ok = np.arange(n_p) != n_p // 2
    sel = ok[:, None] & ok[None, :]
    sel[0, 0] = False
    sel = xp.asarray(sel)
    data[:, :, 0] = xp.where(sel, summed, plane)
    weights[:, :, 0] = xp.where(sel, wsummed, wplane)


def _neighbour_weights(weights: np.ndarray) -> np.ndarray:
    """nn4_ctf's neighbour-count correction ``1 / (1 - alpha * s)`` for every voxel of the half grid.

    Reproduces ``nn4_ctfReconstructor::finish`` as it runs. For a voxel (cx, cy, cz) (cx = 0..Np/2; cy, cz signed,
    see :func:`_signed`) and offsets i, j, k in -3..3: neighbours with cx + i >= Np/2 are skipped, and so are
    offsets with cy + j or cz + j outside (-Np/2, Np/2). The voxel looked at is (cx + i, cy + j, cz + j) -- the
    source writes ``cz + jj`` where ``cz + kk`` was meant, so k only changes the weight ``a[10 - |i| - |j| - |k|]``.
    If cx + i < 0 the source negates its three loop variables in place: at the first in-range j of that i the
    voxel looked at is (-(cx+i), -(cy+j), -(cz+j)) for k = -3 and (-(cx+i), -(cy+j), cz+j) for the other k; for
    later j it is (-(cx+i), cy+j, cz+j). Each looked-at voxel with weight 0 adds its ``a`` to s.
    """
    n_p, _, half = weights.shape
    kc = (_WEIGHT_BOX - 1) // 2
    top = 3 * kc + 1
    a = np.exp(_WEIGHT_RATE * np.arange(top + 1))           # a[c] = exp(0.2 c); SPARX builds it by products
    a[top - 1] = 0.0                                       # pow_a[3 kc] = 0: face neighbours never count
    a[top] = 0.0                                           # the centre (never looked at: its weight is > 0)
    offsets = np.arange(-kc, kc + 1)
    box_max = sum(a[top - abs(i) - abs(j) - abs(k)] for i in offsets for j in offsets for k in offsets
                  if (i, j, k) != (0, 0, 0))
    alpha = (1.0 - 1.0 / _WEIGHT_BOX ** 3) / box_max

    empty = (weights == 0.0).astype(np.float64)
    signed = _signed(n_p)
    lim = n_p // 2
    total = np.zeros_like(weights)
    # cx + i >= 0: look at (cx + i, cy + j, cz + j) for 0 <= cx + i < Np/2, the whole grid at once. For each j the
    # sum over i is a 7-tap correlation along x of the empty voxels shifted by (j, j) in (z, y) and masked, with
    # the Nyquist column cx + i = Np/2 and columns outside the grid (cx + i < 0, handled below) counting 0.
    # The x-correlation commutes with the (z, y) shift and mask, and its taps depend on |j| only: correlate once
    # per |j|, then shift, mask and add for j and -j.
    below_nyquist = empty.copy()
    below_nyquist[:, :, lim:] = 0.0
    for jabs in range(kc + 1):
        taps = [sum(a[top - abs(i) - jabs - abs(k)] for k in offsets) for i in offsets]
        correlated = ndimage.correlate1d(below_nyquist, taps, axis=2, mode="constant", cval=0.0)
        for j in sorted({-jabs, jabs}):
            shifted = np.roll(correlated, (-j, -j), axis=(0, 1))              # shifted[z, y] = correlated[z + j, y + j]
            shifted *= _in_range(signed + j, lim)[:, :, None]
            total += shifted
    for i in offsets:
        # cx + i < 0 (cx = 0 .. -i - 1): the source's in-place Friedel flip, with its sequential state per voxel
        for cx in range(0, min(half, -i)):
            nx = -(cx + i)
            seen = np.zeros((n_p, n_p), bool)                              # (z, y): flipped once already
            for j in offsets:
                a_all = sum(a[top - abs(i) - abs(j) - abs(k)] for k in offsets)
                a_first = a[top - abs(i) - abs(j) - kc]                     # k = -3, the first k of the loop
                in_range = _in_range(signed + j, lim)
                zz = (signed + j)[:, None]
                yy = (signed + j)[None, :]
                first, later = in_range & ~seen, in_range & seen
                total[:, :, cx] += first * (a_first * empty[(-zz) % n_p, (-yy) % n_p, nx]
                                            + (a_all - a_first) * empty[zz % n_p, (-yy) % n_p, nx])
                total[:, :, cx] += later * a_all * empty[zz % n_p, yy % n_p, nx]
                seen |= in_range
    return 1.0 / (1.0 - alpha * total)


def _in_range(shifted: np.ndarray, lim: int) -> np.ndarray:
    """(z, y) mask of the offsets SPARX keeps: both the y and the z neighbour (the same signed value, as the source
    uses j for both) strictly inside (-Np/2, Np/2)."""
    ok = (shifted > -lim) & (shifted < lim)
    return ok[:, None] & ok[None, :]


def _inverse_centre_window(data, n_p: int, m: int, xp=np):
    """The M^3 box about the origin of ``irfftn(data, s=(Np, Np, Np))`` (``padded[np.ix_(i, i, i)]`` with
    i = (arange(M) - M // 2) % Np), without the rest of the padded volume: the inverse
    transform one axis at a time (z, y, then the half-complex x), each followed by the window along that axis, so
    the y and x passes run on M / Np and (M / Np)^2 of the grid (about 58 % of the full inverse's work at npad 2,
    and a quarter of its memory). The same sums as irfftn up to the order of floating-point rounding.
    data : complex (Np, Np, Np // 2 + 1) xp array, rfftn layout. Returns float64 (M, M, M) xp array."""
    def ifft(a, axis):
        if xp is np:
            return scipy.fft.ifft(a, axis=axis, workers=-1)
        return xp.fft.ifft(a, axis=axis)

    def window(a, axis):                     # the negative, then the positive indices: slices, no gather
        c = m // 2
        lead = [slice(None)] * axis
        return xp.concatenate([a[tuple(lead + [slice(n_p - c, None)])], a[tuple(lead + [slice(0, m - c)])]],
                              axis=axis)

    part = window(ifft(data, 0), 0)
    part = window(ifft(part, 1), 1)
    if xp is np:
        part = scipy.fft.irfft(part, n=n_p, axis=2, workers=-1)
    else:
        part = xp.fft.irfft(part, n=n_p, axis=2)
    return window(part, 2).astype(np.float64, copy=False)


def _voxel_shells(n_p: int, xp=np, x_count: int | None = None):
    """floor(|i|) of every voxel of the (Np, Np, Np // 2 + 1) half grid (signed FFT-order coordinates): int64 xp
    array, made where it is used (on a GPU nothing of the grid's size is uploaded). x_count : only the first
    x_count planes kx = 0, 1, ... (shape (Np, Np, x_count))."""
    f = xp.asarray(np.fft.fftfreq(n_p, d=1.0 / n_p).astype(np.int64))
    x = xp.asarray(np.arange(n_p // 2 + 1 if x_count is None else x_count, dtype=np.int64))
    r2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + x[None, None, :] ** 2
    r = xp.floor(xp.sqrt(r2.astype(np.float64))).astype(np.int64)
    r -= (r * r > r2).astype(np.int64)
    r += ((r + 1) * (r + 1) <= r2).astype(np.int64)
    return r


def _circumfnn(vol, npad: int, *, deapodise: bool = True, xp=np):
    """SPARX ``circumfnn`` on an M^3 map (module docstring, finish step 5). Returns a new float64 xp array.
    deapodise False: only the centring and masking (the caller has deapodised for its own insertion)."""
    m = vol.shape[0]
    c = m // 2
    cor = 1.0 if npad == 1 else 4.0
    d = np.abs(np.arange(m) - c).astype(np.float64)
    arg = d * np.pi / (cor * m)
    sinc = np.where(d > 0, np.sin(arg) / np.where(d > 0, arg, 1.0), 1.0)
    if deapodise:
        sinc = xp.asarray(sinc)
        out = vol / (sinc[:, None, None] * sinc[None, :, None] * sinc[None, None, :])
    else:
        out = vol.copy()
    r2 = (d[:, None, None] ** 2 + d[None, :, None] ** 2 + d[None, None, :] ** 2)
    outer, inner = c * c, (c - 1) * (c - 1)
    shell = (r2 >= inner) & (r2 <= outer)
    out -= (out * xp.asarray(shell)).sum() / float(shell.sum())     # the shell's mean, without a boolean index
    return xp.where(xp.asarray(r2 > outer), 0.0, out)
