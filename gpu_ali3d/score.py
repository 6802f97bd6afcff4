"""The alignment objective in Fourier space: normalised correlation of data images with reference projections.

Per (image, pose) pair, for every kept sample k of the image's padded transform (|k| <= kmax, k != 0):
interpolate the prepared reference at ``R.T @ (kx, ky, 0)`` (:func:`gpu_ali3d.gridding.sample_reference`),
multiply by the image's CTF and by the shift phase ``exp(+2 pi i (kx sx + ky sy) / N)`` (which translates the
projection by (-sx, -sy), the convention of :mod:`gpu_ali3d.geometry`), and return

    score = sum_k w_k Re(conj(X_k) P_k) / sqrt(sum_k w_k |X_k|^2 * sum_k w_k |P_k|^2)

with w_k the Hermitian multiplicity of a half-plane sample (2, or 1 on the kx = 0 and kx = N/2 columns). By
Parseval this is exactly the correlation coefficient, over the N x N padded plane, of x_b and p_b: the masked,
normalised, zero-padded image and the padded projection (with CTF and shift), both band-limited to the disc
|k| <= kmax and both with their mean removed (x_b has zero mean by construction, the DC sample is not kept).
(At kmax = N/2 the two self-conjugate Nyquist samples (N/2, 0) and (0, -N/2) enter |P|^2 with their imaginary
part, which a real image cannot carry: a negligible difference, absent for kmax < N/2.)

How this relates to SPARX (``alignment.py`` ``eqproj_cascaded_ccc``; spec/local_ali3d.md)
-------------------------------------------------------------------------------------
Same: the reference is prepared as by ``prep_vol`` (2x padding, KB K = 6, alpha = 1.75, deapodised) and the
projection samples are its central section interpolated with the separable KB window as in ``extract_plane``;
the pose convention, the shift applied as a Fourier phase ramp, and the value being a normalised correlation with
the data image masked by a circle of radius ou (with ts = 0 SPARX returns ``ccc(image, projection, mask)``).

Different, deliberately (DESIGN.md principle 4):

* No inverse FFT per evaluation: the projection stays in Fourier space. It is therefore neither cropped to the
  M x M box nor masked; its whole padded plane enters the normalisation. SPARX's ``ccc`` takes both images'
  means and variances over the pixels of a hard mask. For a reference confined to radius ou the two agree
  closely; they are not identical.
* The image is masked with a soft edge (raised cosine, :func:`prepare_images`) and normalised once per
  iteration; the DC term is dropped, so the projection's mean (which carries no pose information: it is the map's
  integral times CTF(0)) does not enter. Frequencies beyond kmax are left out on both sides.
* The CTF multiplies each 2-D sample; SPARX instead filters the whole 3-D reference by each image's CTF and
  prepares it again whenever the defocus changes.
* Shifts: with ts > 0 SPARX's objective is "cascaded": for given angles it searches the peak of the
  cross-correlation function of the (masked, mean-subtracted) projection and the upsampled data image within +-ts
  pixels, refines it with a 2-D simplex on the KB-interpolated CCF, returns the raw CCF peak (not a coefficient)
  and carries the found shift out as the new shift. Here (sx, sy) are ordinary parameters: the batched simplex
  searches the five parameters jointly and every evaluation returns the normalised coefficient.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft

from .ctf import CTFParams, check_ctf_arguments, evaluate
from .geometry import as_poses, rotation_matrix
from .gridding import PAD, PreparedReference, sample_reference, section_grid

#: Width (pixels) of the raised-cosine edge of the 2-D mask: the mask falls from 1 at ou - 1 to 0 at ou + 1.
MASK_EDGE_PX = 2.0
PATHS = ("reference",)

#: Sample points (pairs x kept samples) per vectorised block of the reference path.
_POINTS_PER_BLOCK = 1 << 18


@dataclass(frozen=True)
class PreparedImages:
    """Data images masked, normalised, padded and transformed once per iteration (:func:`prepare_images`).

    freqs : float64 (S, 2), the kept samples (kx, ky) in padded-grid units (cycles per N pixels), kx >= 0: the
        samples of the ``np.fft.rfft2`` half plane of the L x L image (L = image_pad * M) with 0 < |k| <= kmax,
        in row-major order of that layout (rows ky in FFT order, columns kx = 0..L/2;
        :func:`gpu_ali3d.gridding.section_grid`), each index scaled by N / L.
    weights : float64 (S,), Hermitian multiplicity: 1 where kx == 0 or kx == N/2, else 2.
    data : complex128 (n, S), the images' transforms at those samples, taken about the image centre pixel
        (L // 2, L // 2) of the padded image (= (M // 2, M // 2) of the original), unnormalised L x L DFT.
    ctf : float64 (n, S), each image's CTF at those samples (frequency k / (N apix_A) 1/A), or None (no CTF).
    power : float64 (n,), ``sum_k weights * |data|^2`` (the full-plane power over the kept samples).
    M, N, pad : box, padded box, N = pad * M. image_pad : L / M. ou : mask radius (pixels).
    kmax : resolution limit (padded units). apix_A : pixel size, Angstrom.
    """

    freqs: np.ndarray
    weights: np.ndarray
    data: np.ndarray
    ctf: np.ndarray | None
    power: np.ndarray
    M: int
    N: int
    pad: int
    image_pad: int
    ou: float
    kmax: float
    apix_A: float

    def __len__(self) -> int:
        return self.data.shape[0]


def soft_mask(M: int, ou: float, edge_px: float = MASK_EDGE_PX) -> np.ndarray:
    """The 2-D mask: a circle of radius ou about (M // 2, M // 2) with a raised-cosine edge.

    Returns float64 (M, M): 1 for r <= ou - edge_px/2, 0 for r >= ou + edge_px/2, and
    ``0.5 * (1 + cos(pi * (r - ou + edge_px/2) / edge_px))`` between (value 0.5 at r = ou, so the mask has the
    area of SPARX's hard circle of radius ou). edge_px = 0 gives the hard circle r <= ou.
    """
    c = np.arange(M) - M // 2
    r = np.hypot(c[None, :], c[:, None])
    if edge_px <= 0:
        return (r <= ou).astype(np.float64)
    t = np.clip((r - ou + 0.5 * edge_px) / edge_px, 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * t))


def prepare_images(images, ou: float, *, ctf: CTFParams | None = None, apix_A: float = 1.0, pad: int = PAD,
                   kmax: float | None = None, edge_px: float = MASK_EDGE_PX,
                   image_pad: int | None = None, whiten: np.ndarray | None = None, xp=np) -> PreparedImages:
    """Mask, normalise, zero-pad and Fourier-transform the data images once; keep the samples within kmax.

    images : real array (n, M, M) (or (M, M)), float32 or float64, numpy order (y, x), centre at (M // 2, M // 2).
    ou : mask radius in pixels (:func:`soft_mask`; the edge must fit the box: ou + edge_px/2 <= M // 2).
    ctf : CTFParams of n images (or one for all), or None. apix_A : pixel size (Angstrom), for the CTF.
    pad : N = pad * M (must match the prepared reference). kmax : resolution limit in padded-grid units
        (cycles per N pixels; default N / 2, Nyquist). edge_px : width of the mask's soft edge.
    image_pad : the grid the images are transformed on, L = image_pad * M (a divisor of pad; None = pad).
        pad (the default) takes the transform of the N x N zero-padded image, as SPARX pads before it
        correlates; 1 takes the image's own M x M transform, as RELION compares images, with pad**2 times fewer
        samples. The objective is the same correlation either way up to the projection's wrap-around on the
        M x M grid, which is nil when the reference is confined to a sphere inside the box (refinement masks it
        with radius ou < M / 2): tests/test_score.py measures the difference.

    whiten : a noise power spectrum per ring of the M x M grid (:func:`gpu_ali3d.noise.background_spectrum`), or
        None. Given, every kept sample of the data and of the CTF is multiplied by
        :func:`gpu_ali3d.noise.whitening_weights` (1 / sqrt(noise power) there; without a CTF the weights stand
        in for it, so ``ctf`` is then never None) and ``power`` is that of the whitened data: the objective
        correlates the whitened image with the whitened projection (the whitened objective, --objective).

    xp : the array module the work runs on: numpy (scipy.fft), or cupy (cupy.fft), where ``images`` may already be
        on the device (else they go up once, in their own dtype); the checks cost one sync. ``data``, ``ctf`` and
        ``power`` of the result are then device arrays; ``freqs`` and ``weights`` stay on the host (the kernels'
        launch wrappers read their extent there).

    Each image x becomes ``m * (x - mu) / sigma`` with mu and sigma^2 the mask-weighted mean and variance
    (``sum m x / sum m``; for a hard mask SPARX's in-mask statistics), so its DC term is exactly 0. It is placed
    in an L x L zero image with its centre at (L // 2, L // 2) and transformed with ``rfft2`` about that centre;
    its samples are stored at their padded-grid frequencies (N / L times the L-grid index, integers).
    Returns :class:`PreparedImages` (layouts there).
    """
    imgs = images if (xp is not np and not isinstance(images, np.ndarray)) else np.asarray(images)
    if imgs.ndim == 2:
        imgs = imgs[None]
    if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2]:
        raise ValueError(f"images must be square, shape (n, M, M) or (M, M); got {tuple(imgs.shape)}")
    if np.dtype(imgs.dtype).kind not in "fiu":
        raise TypeError(f"images must be real; got dtype {imgs.dtype}")
    n_img, m = imgs.shape[0], imgs.shape[1]
    if not (np.isfinite(edge_px) and edge_px >= 0):
        raise ValueError(f"edge_px must be >= 0 pixels; got {edge_px}")
    if not (np.isfinite(ou) and ou > 0 and ou + 0.5 * edge_px <= m // 2):
        raise ValueError(f"ou={ou} does not fit a {m}-pixel box with a {edge_px}-pixel soft edge; "
                         f"use 0 < ou <= {m // 2 - 0.5 * edge_px:g}")
    if not isinstance(pad, (int, np.integer)) or pad < 1 or (pad * m) % 2:
        raise ValueError(f"pad={pad!r}: need a positive integer with N = pad * M even; use pad=2")
    check_ctf_arguments(ctf, n_img, apix_A)
    n = pad * m
    image_pad = pad if image_pad is None else image_pad
    if not isinstance(image_pad, (int, np.integer)) or image_pad < 1 or pad % image_pad:
        raise ValueError(f"image_pad={image_pad!r}: need a positive divisor of pad={pad}; use 1 or pad")
    grid = image_pad * m
    kmax = n / 2 if kmax is None else float(kmax)
    if not (np.isfinite(kmax) and kmax > 0):
        raise ValueError(f"kmax must be a positive frequency in padded-grid units (cycles per N pixels); got {kmax}")

    imgs = xp.asarray(imgs).astype(np.float64)                  # up in their own dtype, float64 there
    mask_h = soft_mask(m, ou, edge_px)
    mask = xp.asarray(mask_h)
    msum = float(mask_h.sum())
    mu = xp.einsum("nyx,yx->n", imgs, mask) / msum
    var = xp.einsum("nyx,yx->n", (imgs - mu[:, None, None]) ** 2, mask) / msum
    scale = xp.einsum("nyx,yx->n", imgs ** 2, mask) / msum
    # the checks, in one copy to the host: non-finite pixels; images whose var is rounding noise (constant)
    finite = xp.isfinite(imgs).all(axis=(1, 2))
    bad = ~finite | ~(var > 1e-20 * scale)
    flags = bad if xp is np else xp.asnumpy(bad)
    if flags.any():
        finite_h = np.asarray(finite if xp is np else xp.asnumpy(finite))
        if not finite_h.all():
            raise ValueError("images contain NaN or inf pixels")
        first = int(np.flatnonzero(flags)[0])
        raise ValueError(f"image {first} is constant inside the mask of radius {ou}; it cannot be normalised")
    normed = mask * (imgs - mu[:, None, None]) / xp.sqrt(var)[:, None, None]

    # the transform about the centre pixel: the image goes into the L x L array with its centre at index 0 (the
    # rest wrapped around), i.e. ifftshift of the image centred at L // 2
    c = m // 2
    if grid == m:
        padded = xp.roll(normed, (-c, -c), axis=(1, 2))
    else:
        padded = xp.zeros((n_img, grid, grid))
        padded[:, :m, :m] = normed
        padded = xp.roll(padded, (-c, -c), axis=(1, 2))
    spectrum = scipy.fft.rfft2(padded, workers=-1) if xp is np else xp.fft.rfft2(padded)

    kx, ky = section_grid(grid)
    kx, ky = kx * (n // grid), ky * (n // grid)                             # in padded-grid units
    r2 = kx ** 2 + ky ** 2
    keep = (r2 <= kmax ** 2) & (r2 > 0)
    freqs = np.stack([kx[keep], ky[keep]], axis=1)
    weights = np.where((freqs[:, 0] == 0) | (freqs[:, 0] == n // 2), 1.0, 2.0)
    # the kept samples by their flat indices in the half plane (a boolean index would sync a GPU for its size)
    data = xp.take(spectrum.reshape(n_img, -1), xp.asarray(np.flatnonzero(keep.ravel())), axis=1)
    ctf_values = None
    if ctf is not None:
        ctf_values = evaluate(ctf, freqs[:, 0] / (n * apix_A), freqs[:, 1] / (n * apix_A), xp=xp)
        if ctf_values.shape[0] != n_img:                                    # one CTF for all the images
            ctf_values = ctf_values * xp.ones((n_img, 1))
    if whiten is not None:
        from .noise import whitening_weights

        w = xp.asarray(whitening_weights(whiten, freqs, n, m))
        data = data * w
        ctf_values = (xp.ones((n_img, 1)) if ctf_values is None else ctf_values) * w
    power = xp.einsum("s,ns->n", xp.asarray(weights), xp.abs(data) ** 2)
    return PreparedImages(freqs=freqs, weights=weights, data=data, ctf=ctf_values, power=power, M=m, N=n,
                          pad=int(pad), image_pad=int(image_pad), ou=float(ou), kmax=kmax, apix_A=float(apix_A))


def make_objective(ref: PreparedReference, prepared: PreparedImages, *, backend=None):
    """The objective for the batched simplex: ``f(points (m, 5), owner (m,)) -> (m,)`` scores.

    ref : PreparedReference, or (kernel path) a :class:`gpu_ali3d.kernels.KernelReference` converted once per
        iteration by the caller (``kernel_reference(backend, ref, kmax)``, cropped to the band limit), so that
        several batches of images share one copy on the device.
    backend : None for the numpy reference path (float64; :func:`score`), or a
        :class:`gpu_ali3d.backend.Backend` for the compiled kernel (kernels/score.cu) on its device. The images
        (and the reference, if not converted yet) are converted for the kernel once, here; points and owner are arrays of ``backend.xp`` and so
        is the result, so nothing crosses between host and device inside the simplex.
    """
    if backend is None:
        return lambda points, owner: score(ref, prepared, points, image_index=owner)
    from .kernels import KernelReference, kernel_images, kernel_reference, score_kernel

    kref = ref if isinstance(ref, KernelReference) else kernel_reference(backend, ref, kmax=prepared.kmax)
    if kref.N != prepared.N:
        raise ValueError(f"reference has N={kref.N} but the images N={prepared.N}; prepare both with one box and pad")
    kimg = kernel_images(backend, prepared)
    # owner indices come from the simplex over these images (valid by construction): no per-call range check
    return lambda points, owner: score_kernel(backend, kref, kimg, points, owner, check_index=False)


def score(ref: PreparedReference, prepared: PreparedImages, poses, *, image_index=None,
          path: str = "reference") -> np.ndarray:
    """Normalised correlation of each (image, pose) pair (module docstring for the formula).

    ref : :class:`gpu_ali3d.gridding.PreparedReference` of the same M and pad as ``prepared``.
    prepared : :class:`PreparedImages`.
    poses : float array (n, 5) or (5,): phi, theta, psi (degrees), sx, sy (pixels) (:mod:`gpu_ali3d.geometry`).
    image_index : int array (n,), the image each pose is scored against (several poses per image allowed);
        None pairs pose i with image i (then n must equal the number of images).
    path : "reference" (numpy, float64). The compiled kernel path is :func:`make_objective` with a backend.
    Returns float64 (n,), in [-1, 1]; 0 where the projection has no power within kmax.
    """
    if path not in PATHS:
        raise ValueError(f"path={path!r}; expected one of {PATHS}")
    if (ref.M, ref.N) != (prepared.M, prepared.N):
        raise ValueError(f"reference is M={ref.M}, N={ref.N} but the images are M={prepared.M}, N={prepared.N}; "
                         "prepare both with the same box and pad")
    p = as_poses(poses)
    if image_index is None:
        if len(p) != len(prepared):
            raise ValueError(f"{len(p)} poses for {len(prepared)} images: give image_index to pair them")
        idx = np.arange(len(p))
    else:
        idx = np.asarray(image_index)
        if idx.shape != (len(p),) or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"image_index must be an integer array of shape ({len(p)},); got {idx.dtype} "
                             f"{idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(prepared)):
            raise ValueError(f"image_index out of range [0, {len(prepared)}): {idx.min()}..{idx.max()}")
    return _score_reference(ref, prepared, p, idx)


# ----------------------------------------------------------------------------------------------- helpers
def _score_reference(ref: PreparedReference, prep: PreparedImages, poses: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """numpy float64 reference: blocks of pairs, each vectorised over (pair, sample)."""
    kx, ky = prep.freqs[:, 0], prep.freqs[:, 1]
    w = prep.weights
    out = np.zeros(len(poses))
    block = max(1, _POINTS_PER_BLOCK // max(1, len(kx)))
    for start in range(0, len(poses), block):
        p = poses[start:start + block]
        i = idx[start:start + block]
        rot = rotation_matrix(p[:, 0], p[:, 1], p[:, 2])                            # (b, 3, 3)
        u = rot[:, None, 0, :] * kx[None, :, None] + rot[:, None, 1, :] * ky[None, :, None]   # R.T @ (kx, ky, 0)
        proj = sample_reference(ref, u)                                             # (b, S)
        proj *= np.exp(2j * np.pi * (kx[None, :] * p[:, 3, None] + ky[None, :] * p[:, 4, None]) / prep.N)
        if prep.ctf is not None:
            proj *= prep.ctf[i]
        cross = np.einsum("s,bs->b", w, (np.conj(prep.data[i]) * proj).real)
        ppow = np.einsum("s,bs->b", w, np.abs(proj) ** 2)
        den = np.sqrt(prep.power[i] * ppow)
        out[start:start + block] = np.where(den > 0, cross / np.where(den > 0, den, 1.0), 0.0)
    return out
