"""Alignment of a batch of images against one reference: every image's simplex over its five pose parameters.

Two paths behind :func:`align_poses`, with the same rules (:mod:`gpu_ali3d.simplex`) and the same objective
(:mod:`gpu_ali3d.score`):

* backend None, the reference: :func:`gpu_ali3d.simplex.amoeba_batched` (numpy lockstep) on the float64 numpy
  objective (``score.make_objective(..., backend=None)``);
* a backend: one launch of kernels/align.cu per batch (:func:`align_kernel`), in which one block runs one image's
  whole amoeba and every evaluation is the score kernel's body (kernels/score.cuh) over the image's samples. Only
  the batch's poses, scores and counts come back. On the CPU the same source runs with OpenMP over the images, so
  an image's samples stay in cache across its ~150 evaluations.

tests/test_alignment.py holds the kernel to amoeba_batched driven by kernels/score.cu (the same decisions and
poses), and align_poses' two paths to each other on the RELION-simulated particles.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import euler_from_matrix, rotation_matrix
from .io.stack import materialise

#: Host memory the prepared images of one alignment batch may take when --batch is 0 (auto).
BATCH_MEMORY_BYTES = 1 << 30
#: The images are compared with the reference's sections on their own M x M Fourier grid (as RELION does), not on
#: SPARX's 2x zero-padded one: 4x fewer samples for the same correlation (score.prepare_images, image_pad).
IMAGE_PAD = 1
#: The objective leaves out the frequencies where the reference's tanh filter passes less than this fraction of
#: the amplitude (:func:`alignment_band_limit`). 0.45 keeps little beyond the cut-off. With the adaptive mask the
#: FSC, the cut-off and so the band rise (GPCR, box 128: 51 instead of 31 Fourier pixels at level 0.1), and the
#: alignment's cost with the band's area. bench/bench_automask.py, 1,000 GPCR particles (SNR 0.05, 5 iterations),
#: levels 0.1, 0.3, 0.45: 1.21, 1.26, 1.28 deg at 1.94, 1.26, 1.06x the seconds per iteration of the sphere-masked
#: run at level 0.1 (1.72 deg); 2,000 70S particles (3 iterations): 1.70, 1.72, 1.71 deg (sphere: 1.72) at 1.01,
#: 0.82, 0.76x. The sphere-masked box-64 runs of bench/bench_band.py (levels 0.01-0.2) gave one error at all.
BAND_LEVEL = 0.45
#: Parameters of the simplex of kernels/align.cu (phi, theta, psi, sx, sy).
POSE_DIM = 5


def align_poses(images, poses, volf, ctf, apix, ou, opts, cutoff, falloff, backend, progress, label, *,
                full_band: "FullBandImages | None" = None, rows: np.ndarray | None = None,
                noise_spectrum: np.ndarray | None = None):
    """Refine the poses of some images against one reference by SPARX's amoeba over (phi, theta, psi, sx, sy).

    images : real (n, M, M), a host array or one of the backend's device (where a GPU run keeps them). poses : float64 (n, 5) host array, the start poses (degrees, pixels;
    :mod:`gpu_ali3d.geometry`). volf : float64 (M, M, M), the reference (after the user function). ctf : CTFParams
    of the n images or None. apix : Angstrom per pixel. ou : mask radius (pixels). opts : RefineOptions
    (interpolation, delta, ts, batch). cutoff, falloff : the reference's tanh filter (absolute frequency), which
    sets the band limit (:func:`alignment_band_limit`). backend : None for the numpy reference path, else a
    :class:`gpu_ali3d.backend.Backend` (kernels/align.cu on its device). progress : show a bar per batch, with label.

    The reference is prepared and converted for the kernel once; the images are prepared batch by batch
    (:func:`alignment_batch` images at a time, sized from host and device memory) on the backend's device
    (masking, normalisation, FFT, CTF: :func:`gpu_ali3d.score.prepare_images` on its xp). Where the best pose found scores
    worse than the start, the start is kept (as SPARX keeps the old parameters).

    Returns (new poses float64 (n, 5) with angles in SPIDER's ranges, score at the start (n,), score after (n,),
    kmax in padded-grid units, int64 [objective evaluations, simplex steps] summed over the images). Evaluations:
    the kernel's own count (the 6 initial vertices included); the reference path also counts the separate
    evaluation of the start.

    full_band, rows : with a backend, the images already prepared at every frequency (:func:`prepare_full_band`,
        kept by refine for the run) and which of its images these are (int array; None: all, in order); each batch
        then takes its samples within the band from there instead of preparing ``images`` again (the same
        KernelImages bit for bit, so the same poses). ``images`` is then only read for its box.
    noise_spectrum : None for SPARX's plain correlation, or the noise power per ring
        (:func:`gpu_ali3d.noise.background_spectrum`) that whitens the objective (score.prepare_images ``whiten``;
        a full_band given must have been prepared with the same one).
    """
    from tqdm import tqdm

    from .gridding import prepare_reference
    from .score import prepare_images

    box = images.shape[-1]
    kmax = 2 * box * alignment_band_limit(cutoff, falloff, box)            # padded-grid units (N = 2 M)
    if backend is None:
        ref = prepare_reference(volf, pad=2, interpolation=opts.interpolation)
    else:
        from .kernels import band_reference
        # once per reference, made on the device and only for the band; all batches share it
        ref = band_reference(backend, volf, kmax, pad=2, interpolation=opts.interpolation)
    new = np.empty_like(poses, dtype=np.float64)
    work = np.zeros(2, dtype=np.int64)                      # evaluations, simplex steps
    before = np.empty(len(poses))
    after = np.empty(len(poses))
    size = alignment_batch(len(poses), box, opts.batch,
                           device_free=None if backend is None else backend.free_memory_bytes(),
                           samples=int(np.pi * (kmax / 2) ** 2 / 2) + 1)
    if full_band is not None:
        rows = np.arange(len(full_band)) if rows is None else np.asarray(rows, dtype=np.int64)
        if backend is None or len(rows) != len(poses):
            raise ValueError(f"full_band needs a backend and one row per pose ({len(rows)} rows, {len(poses)} poses)")
    for start in tqdm(range(0, len(poses), size), desc=label, unit="batch", disable=not progress, leave=False):
        sl = slice(start, min(start + size, len(poses)))
        if full_band is not None:
            best, fbest, f0, evals, steps = _align_fused(backend, ref, full_band.band(backend, kmax, rows[sl]),
                                                         poses[sl], opts)
        else:
            prep = prepare_images(materialise(images[sl]), ou, ctf=ctf[sl] if ctf is not None else None,
                                  apix_A=apix, kmax=kmax, image_pad=IMAGE_PAD, whiten=noise_spectrum,
                                  xp=np if backend is None else backend.xp)
            if backend is None:
                best, fbest, f0, evals, steps = _align_reference(ref, prep, poses[sl], opts)
            else:
                best, fbest, f0, evals, steps = _align_fused(backend, ref, prep, poses[sl], opts)
        work += (evals, steps)
        new[sl], before[sl], after[sl] = normalise_poses(best), f0, fbest
    return new, before, after, kmax, work


@dataclass(frozen=True)
class FullBandImages:
    """A rank's images prepared for the fused alignment once, at every frequency up to Nyquist, on the backend's
    device (:func:`prepare_full_band`): the part of an iteration's image preparation that no reference changes
    (masking, normalisation, FFT, CTF), kept for the run by refine where it fits (:func:`full_band_bytes`).
    Each iteration takes the samples within its band limit (:meth:`band`).

    freqs : float64 (S, 2) and weights : float64 (S,) host arrays, every sample of score.prepare_images with
    0 < |k| <= N / 2, in its order. data : complex64 (n, S), ctf : float32 (n, S) or None, sample_power : float64
    (n, S) |X|^2 of the float64 transform, all backend arrays. N : padded box (pad 2).
    """

    freqs: np.ndarray
    weights: np.ndarray
    data: object
    ctf: object
    sample_power: object
    M: int
    N: int

    def __len__(self) -> int:
        return self.data.shape[0]

    def band(self, backend, kmax: float, rows) -> "KernelImages":
        """The KernelImages of images ``rows`` (host int array) with the samples 0 < |k| <= kmax (padded-grid
        units): bit for bit ``kernel_images(prepare_images(those images, ..., kmax=kmax))``, as the same samples
        are taken in the same order (score.prepare_images keeps r2 <= kmax^2 of the same frequencies) and the
        power is summed over the same values."""
        from .kernels import kernel_images
        from .score import PreparedImages

        xp = backend.xp
        r2 = self.freqs[:, 0] ** 2 + self.freqs[:, 1] ** 2
        cols = np.flatnonzero(r2 <= float(kmax) ** 2)
        rows_d, cols_d = xp.asarray(np.asarray(rows, dtype=np.int64)), xp.asarray(cols)

        def take(a):
            return None if a is None else xp.take(xp.take(a, rows_d, axis=0), cols_d, axis=1)

        weights = self.weights[cols]
        power = xp.einsum("s,ns->n", xp.asarray(weights), take(self.sample_power))
        prep = PreparedImages(freqs=self.freqs[cols], weights=weights, data=take(self.data), ctf=take(self.ctf),
                              power=power, M=self.M, N=self.N, pad=self.N // self.M, image_pad=IMAGE_PAD, ou=0.0,
                              kmax=float(kmax), apix_A=0.0)
        return kernel_images(backend, prep)


def prepare_full_band(images, ctf, apix: float, ou: float, backend, *, batch: int = 0,
                      noise_spectrum: np.ndarray | None = None) -> FullBandImages:
    """:class:`FullBandImages` of ``images`` (real (n, M, M), host or the backend's device) with their CTF
    (CTFParams of n or None), as score.prepare_images makes them for the alignment (pad 2, :data:`IMAGE_PAD`,
    kmax N / 2, whitened by ``noise_spectrum`` where one is given), ``batch`` images at a time (0:
    :func:`alignment_batch`'s host budget)."""
    from .score import prepare_images

    xp = backend.xp
    n, box = len(images), images.shape[-1]
    size = alignment_batch(n, box, batch)
    parts = []
    for start in range(0, n, size):
        sl = slice(start, min(start + size, n))
        prep = prepare_images(materialise(images[sl]), ou, ctf=ctf[sl] if ctf is not None else None, apix_A=apix,
                              kmax=None, image_pad=IMAGE_PAD, whiten=noise_spectrum, xp=xp)
        parts.append((prep.data.astype(np.complex64), None if prep.ctf is None else prep.ctf.astype(np.float32),
                      xp.abs(prep.data) ** 2))
        freqs, weights, n_pad = prep.freqs, prep.weights, prep.N
        del prep
    if not parts:
        raise ValueError("prepare_full_band needs at least one image")

    def join(i):
        return None if parts[0][i] is None else (parts[0][i] if len(parts) == 1
                                                 else xp.concatenate([p[i] for p in parts]))

    return FullBandImages(freqs=freqs, weights=weights, data=join(0), ctf=join(1), sample_power=join(2), M=box,
                          N=n_pad)


def full_band_bytes(n: int, box: int) -> int:
    """Bytes of :func:`prepare_full_band` for n images: complex64 data, float32 CTF and float64 power per sample
    (20 B), about pi box^2 / 8 samples per image (the half plane within Nyquist)."""
    return 20 * int(np.pi * box * box / 8 + box) * n


def align_kernel(backend, kref, kimg, x0, scales, *, ftol: float, xtol: float, itmax: int,
                 check_scales: bool = True):
    """Launch kernels/align.cu: the whole amoeba (:mod:`gpu_ali3d.simplex` rules) of every image in one launch.

    kref : :class:`gpu_ali3d.kernels.KernelReference` (cropped to at least the images' samples); kimg :
    :class:`gpu_ali3d.kernels.KernelImages` of n images (:func:`gpu_ali3d.kernels.kernel_images`).
    x0 : float64 (n, 5), C-contiguous, backend array: start poses phi, theta, psi (degrees), sx, sy (pixels).
    scales : float64 (n, 5), C-contiguous, backend array: initial steps (:func:`gpu_ali3d.simplex.local_ali3d_scales`),
        finite and nonzero. ftol, xtol, itmax : as :func:`gpu_ali3d.simplex.amoeba_scalar`.
    check_scales : read the scales' validity back from the device (one sync); callers whose scales come from
        local_ali3d_scales (it refuses a bad delta or ts; :func:`_align_fused`) pass False.

    Returns backend arrays ``(x_best, f_best, steps, evals, f0)``: float64 (n, 5) best pose (x0 where it scores
    worse than x0), float64 (n,) its score, int64 (n,) completed steps, int64 (n,) objective evaluations (the 6
    initial vertices included), float64 (n,) the score at x0. The scores are score.py's normalised correlation.
    All five are views of one device buffer (:func:`_launch_align`), so the batch's results come back in one copy.
    """
    return _unpack_results(_launch_align(backend, kref, kimg, x0, scales, ftol=ftol, xtol=xtol, itmax=itmax,
                                         check_scales=check_scales), len(kimg))


def alignment_band_limit(cutoff: float, falloff: float, box: int) -> float:
    """The highest frequency (cycles per pixel) the objective uses: where the reference's tanh low-pass (cut-off,
    fall-off from the FSC) falls to :data:`BAND_LEVEL` (:func:`gpu_ali3d.resolution.tanl_band_limit`); at most
    Nyquist (0.5) and at least 4 Fourier pixels (4 / box), so a failed fit cannot leave the simplex without
    samples. As RELION, the search uses the current resolution only."""
    from .resolution import tanl_band_limit

    return float(min(0.5, max(4.0 / box, tanl_band_limit(cutoff, falloff, BAND_LEVEL))))


def alignment_batch(n: int, box: int, requested: int = 0, *, budget: int = BATCH_MEMORY_BYTES,
                    device_free: int | None = None, samples: int | None = None) -> int:
    """Images per alignment batch (one kernel launch): ``requested`` if > 0, else as many as fit ``budget`` bytes
    of host memory while they are prepared (:func:`_prepared_bytes_per_image`) and, on a GPU (``device_free``: its
    free bytes), half of the free device memory for their kernel copy and results (:func:`_device_bytes_per_image`,
    ``samples`` kept Fourier samples per image; default all within Nyquist); at least 1."""
    if requested > 0:
        return min(requested, max(n, 1))
    size = budget // _prepared_bytes_per_image(box)
    if device_free is not None:
        size = min(size, (device_free // 2) // _device_bytes_per_image(box, samples))
    return max(1, min(n, size))


def normalise_poses(poses: np.ndarray) -> np.ndarray:
    """Same rotations, angles brought to SPIDER's ranges (phi, psi in [0, 360), theta in [0, 180])."""
    out = np.asarray(poses, dtype=np.float64).copy()
    out[:, 0], out[:, 1], out[:, 2] = euler_from_matrix(rotation_matrix(out[:, 0], out[:, 1], out[:, 2]))
    return out


# ----------------------------------------------------------------------------------------------- helpers
def _align_fused(backend, kref, prep, poses, opts):
    """One batch through kernels/align.cu; host arrays (best, fbest, f0, evaluations, steps) come back.
    prep : PreparedImages, or KernelImages already in the kernel's form (:meth:`FullBandImages.band`).

    What a GPU pays per batch (tests/test_gpu_budget.py): the images were prepared on the device (their checks: one
    sync), so :func:`kernel_images` converts there and uploads only the shared sample frequencies and weights; one
    upload of the start poses and scales (made on the host, where the poses are), one launch, and one copy back of
    the packed results: one more sync."""
    from .kernels import KernelImages, kernel_images
    from .simplex import SPARX_SERIAL, local_ali3d_scales

    xp = backend.xp
    kimg = prep if isinstance(prep, KernelImages) else kernel_images(backend, prep)
    x0 = np.ascontiguousarray(poses, dtype=np.float64)
    scales = local_ali3d_scales(x0[:, 1], opts.delta, opts.ts)       # finite and nonzero: it checks delta and ts
    start = xp.asarray(np.stack([x0, scales]))              # (2, n, 5): one copy; [0] and [1] are C-contiguous
    packed = _launch_align(backend, kref, kimg, start[0], start[1], check_scales=False, **SPARX_SERIAL)
    best, fbest, steps, evals, f0 = _unpack_results(backend.to_host(packed), len(kimg))
    return best, fbest, f0, int(evals.sum()), int(steps.sum())


def _launch_align(backend, kref, kimg, x0, scales, *, ftol, xtol, itmax, check_scales=True):
    """The launch of :func:`align_kernel`, its results in one float64 device buffer of 9 n values
    (:func:`_unpack_results`): x_best (5 n), f_best, f0, then steps and evals as int64 bit patterns."""
    from .kernels import INTERP_ENTRY, _check_array, check_kernel_inputs, phase_table_bytes
    from .simplex import _check_controls

    xp = backend.xp
    check_kernel_inputs(kref, kimg, xp)
    n = len(kimg)
    _check_array("x0", x0, np.float64, (n, POSE_DIM), xp)
    _check_array("scales", scales, np.float64, (n, POSE_DIM), xp)
    _check_controls(ftol, xtol, itmax)
    if check_scales and n and not bool(xp.all(xp.isfinite(scales) & (scales != 0.0))):
        raise ValueError(_BAD_SCALES)
    packed = xp.empty(_RESULT_WIDTH * n, dtype=np.float64)
    x_best, f_best, steps, evals, f0 = _unpack_results(packed, n)
    n_s = kimg.data.shape[1]
    ctf = kimg.ctf if kimg.ctf is not None else kimg.weights         # not read when has_ctf = 0
    backend.kernels.launch("align", f"align_{INTERP_ENTRY[kref.kind]}", n, [
        kref.data, np.int32(kref.N), np.int32(kref.halo), np.int32(kref.extent), np.int32(kref.taps),
        kref.window, np.int32(kref.window.shape[0] - 1), kimg.freqs, kimg.weights,
        np.int32(n_s), np.int32(kimg.k_index), kimg.data, ctf, np.int32(kimg.ctf is not None), kimg.power,
        x0, scales, np.int64(n), np.float64(ftol), np.float64(xtol), np.int64(itmax),
        x_best, f_best, f0, steps, evals], shared_mem=phase_table_bytes(kimg.k_index))
    return packed


#: float64 values per image in :func:`_launch_align`'s buffer: pose (5), f_best, f0, steps, evals.
_RESULT_WIDTH = POSE_DIM + 4
_BAD_SCALES = ("scales must be finite and nonzero (the convergence test divides by them); make them with "
               "simplex.local_ali3d_scales from a positive delta and ts")


def _unpack_results(packed, n: int):
    """(x_best (n, 5), f_best, steps, evals, f0): C-contiguous views of a packed result buffer, on whichever side
    (device or host) it is; steps and evals are the int64 views of their float64 slots."""
    d = POSE_DIM * n
    x_best = packed[:d].reshape(n, POSE_DIM)
    f_best, f0 = packed[d:d + n], packed[d + n:d + 2 * n]
    steps = packed[d + 2 * n:d + 3 * n].view(np.int64)
    evals = packed[d + 3 * n:d + 4 * n].view(np.int64)
    return x_best, f_best, steps, evals, f0


def _align_reference(ref, prep, poses, opts):
    """One batch through simplex.amoeba_batched on the numpy float64 objective (the reference path)."""
    from .score import make_objective
    from .simplex import SPARX_SERIAL, amoeba_batched, local_ali3d_scales

    score_pairs = make_objective(ref, prep, backend=None)
    evaluations = [0]

    def objective(points, owner):
        evaluations[0] += points.shape[0]
        return score_pairs(points, owner)

    x0 = np.asarray(poses, dtype=np.float64)
    f0 = objective(x0, np.arange(len(x0)))
    scales = local_ali3d_scales(x0[:, 1], opts.delta, opts.ts)
    best, fbest, steps = amoeba_batched(objective, x0, scales, **SPARX_SERIAL)
    worse = fbest < f0            # keep the start where nothing better was found, as SPARX keeps the old parameters
    best[worse], fbest[worse] = x0[worse], f0[worse]
    return best, fbest, f0, evaluations[0], int(steps.sum())


def _device_bytes_per_image(box: int, samples: int | None = None) -> int:
    """Device bytes per image of an alignment batch: complex64 data and float32 CTF per kept sample (12 B;
    ``samples``, by default about pi box^2 / 8, all within Nyquist of the M x M grid), then the power, start
    pose, scales and the kernel's results (best pose, scores, counts: about 160 B, 256 counted). The simplex
    itself lives inside kernels/align.cu (each block's registers and local memory), not in device arrays."""
    s = int(np.pi * box * box / 8) if samples is None else int(samples)
    return 12 * s + 256


def _prepared_bytes_per_image(box: int, image_pad: int = IMAGE_PAD) -> int:
    """Peak host bytes per image in score.prepare_images: the L x L float64 image and its complex128 half
    transform (L = image_pad * box; about 16 L^2 bytes), then complex128 data and float64 CTF per kept sample
    (about pi L^2 / 8 samples within Nyquist)."""
    side = image_pad * box
    return 16 * side * side + 24 * int(np.pi * side * side / 8)
