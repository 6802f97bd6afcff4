"""Kaiser-Bessel gridding of a 2x-oversampled reference transform: the numpy reference projector.

This is SPARX's "highly accurate gridding" (``prep_vol`` + ``extract_plane``; spec/local_ali3d.md), in float64.
Conventions are those of :mod:`gpu_ali3d.geometry` (poses) and :mod:`gpu_ali3d.projection` (map centre).

Units and grids
---------------
* A map is a real array (M, M, M), numpy order (z, y, x), centre voxel at index M // 2 on each axis. Its
  transform is ``F(q) = sum_r V(r) exp(-2 pi i q.r / M)``, q in cycles per box (x, y, z order), r the voxel
  position relative to the centre voxel.
* The padded grid has N = pad * M samples per axis (pad = 2 as in SPARX, N must be even). **Padded-grid units**:
  a frequency u (x, y, z) is measured in cycles per N pixels, i.e. in steps of 1/N cycles per original pixel;
  ``u = pad * q``. Nyquist of the original pixel is |u| = N / 2.
* The Kaiser-Bessel window has width K = ``kb_width`` padded-grid samples (6) and shape parameter
  ``beta = 2 pi alpha r v`` with SPARX's ``r = M / 2`` and ``v = K / (2 N)``, hence ``beta = pi alpha K / (2 pad)``
  (8.247 for alpha = 1.75, K = 6, pad = 2: independent of M).
* A projection at rotation R samples the reference at ``u = R.T @ (kx, ky, 0)`` for image frequencies (kx, ky) in
  padded-grid units, so that the sampled values are the 2-D DFT of the projection zero-padded to N x N.

Normalisation (how it relates to SPARX)
---------------------------------------
SPARX divides the map by ``sinhwin`` (the window's Fourier transform normalised to 1 at the centre), interpolates
with ``i0win`` weights (1 at distance 0), and rescales each extracted plane by (number of samples) / (sum of all
weights), i.e. by about 1 / (integral of the window). We fold that constant into the deapodisation: the map is
divided by the window's exact continuous transform (:func:`kb_deapodisation`, whose value at the centre is the
window's integral), so interpolation needs no rescaling and :func:`sample_reference` approximates ``F(u / pad)``
directly. Taps that leave the N^3 grid wrap periodically (the padded transform is an N-periodic DFT), with the
Friedel mate ``F(-u) = conj(F(u))`` for taps at negative x, as SPARX's ``extract_plane`` does. Sample points
beyond the Nyquist sphere |u| > N / 2 (SPARX's ``rim``) are zero.

Trilinear interpolation is an option (``interpolation="trilinear"``): the hat window of width 2 with its own
deapodisation ``sinc^2(x / N)``, chosen when the reference is prepared.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy.special import i0

from .ctf import CTFParams, check_ctf_arguments, ctf_grid
from .geometry import as_poses, rotation_matrix

#: SPARX prep_vol's gridding parameters.
PAD = 2
KB_WIDTH = 6
KB_ALPHA = 1.75
INTERPOLATIONS = ("kb", "trilinear")

#: Taps (points x K^3) per vectorised block of :func:`sample_reference`: work arrays of about 40 MB.
_TAPS_PER_BLOCK = 216 << 13
#: Section samples (poses x samples) per block of :func:`central_section`.
_SECTION_POINTS_PER_BLOCK = 1 << 18


@dataclass(frozen=True)
class PreparedReference:
    """The padded, deapodised transform of a map, ready for interpolation (:func:`prepare_reference`).

    data : complex128 (N + 2h + 1, N + 2h + 1, N // 2 + 1 + 2h), axes (z, y, x) as the map, h = ``halo``
        (= taps // 2). It holds the transform
        ``F_pad(u) = sum_r (V(r) / D(r)) exp(-2 pi i u.r / N)`` (r relative to the map's centre voxel, which sits
        at N // 2 of the padded box; D the separable deapodisation; unnormalised, no 1/N^3) at integer u:

            data[N//2 + h + u_z, N//2 + h + u_y, h + u_x] = F_pad(u_x, u_y, u_z)
            for u_z, u_y in [-N/2 - h, N/2 + h] and u_x in [-h, N/2 + h].

        That is the rfftn half cube (u_x >= 0) with z and y centred, plus a halo of h samples on every side
        filled with the periodic (period N) and Friedel (``F_pad(-u) = conj F_pad(u)``) copies, so that every tap
        of a point with |u| <= N/2 and u_x >= 0 is a plain array read. :attr:`half_cube` is the unpadded view.
    M : side of the original map. N : side of the padded grid (pad * M). pad : oversampling factor.
    kb_width : K, window width in padded-grid samples. kb_alpha : SPARX's alpha.
    interpolation : "kb" or "trilinear"; the window the deapodisation was made for.
    halo : h, extra samples on each side of the stored grid.
    """

    data: np.ndarray
    M: int
    N: int
    pad: int
    kb_width: int
    kb_alpha: float
    interpolation: str
    halo: int

    @property
    def half_cube(self) -> np.ndarray:
        """View (N, N, N // 2 + 1) of :attr:`data` without the halo: index (N//2 + u_z, N//2 + u_y, u_x)."""
        h, n = self.halo, self.N
        return self.data[h:h + n, h:h + n, h:h + n // 2 + 1]

    @property
    def taps(self) -> int:
        """Interpolation taps per axis: K for Kaiser-Bessel, 2 for trilinear."""
        return self.kb_width if self.interpolation == "kb" else 2

    @property
    def beta(self) -> float:
        """The Kaiser-Bessel shape parameter ``2 pi alpha r v = pi alpha K / (2 pad)``."""
        return kb_beta(self.kb_width, self.kb_alpha, self.pad)


def kb_beta(kb_width: int = KB_WIDTH, kb_alpha: float = KB_ALPHA, pad: int = PAD) -> float:
    """SPARX's Kaiser-Bessel shape parameter ``fac = 2 pi alpha r v`` with r = M/2, v = K/(2N): pi alpha K/(2 pad)."""
    return float(np.pi * kb_alpha * kb_width / (2.0 * pad))


def kb_weights(dist, *, kb_width: int = KB_WIDTH, kb_alpha: float = KB_ALPHA, pad: int = PAD) -> np.ndarray:
    """The Kaiser-Bessel window in Fourier space (one axis; the 3-D window is the product over axes).

    dist : float array, distance from the sample point in padded-grid samples.
    Returns float64 of the same shape: ``I0(beta sqrt(1 - (2 d / K)^2)) / I0(beta)`` for |d| < K/2, else 0
    (SPARX ``KaiserBessel::i0win``, 1 at d = 0; ``beta`` from :func:`kb_beta`).
    """
    d = np.asarray(dist, dtype=np.float64)
    half = 0.5 * kb_width
    beta = kb_beta(kb_width, kb_alpha, pad)
    t = np.clip(1.0 - (d / half) ** 2, 0.0, None)
    return np.where(np.abs(d) < half, i0(beta * np.sqrt(t)) / i0(beta), 0.0)


def kb_deapodisation(M: int, *, pad: int = PAD, kb_width: int = KB_WIDTH, kb_alpha: float = KB_ALPHA) -> np.ndarray:
    """The real-space transform of :func:`kb_weights` at the voxel positions of an M-box (one axis).

    Returns float64 (M,): ``D(x) = integral w(u) exp(-2 pi i u x / N) du`` at ``x = i - M // 2`` pixels, N = pad*M:

        D(x) = K / I0(beta) * sinh(z) / z,  z = sqrt(beta^2 - (pi K x / N)^2)   (sin(|z|)/|z| once z is imaginary)

    SPARX's ``sinhwin`` is ``D(x) / D(0)``; its first zero lies at |x| = alpha M / 2, outside the box for alpha > 1.
    The map is divided by ``D(x) D(y) D(z)`` before padding (:func:`prepare_reference`).
    """
    _check_window(M, pad, kb_width, kb_alpha)
    beta = kb_beta(kb_width, kb_alpha, pad)
    x = np.arange(M) - M // 2
    z2 = beta ** 2 - (np.pi * kb_width * x / (pad * M)) ** 2
    z = np.sqrt(np.abs(z2))
    safe = np.where(z > 0, z, 1.0)
    shape = np.where(z2 > 0, np.sinh(safe) / safe, np.sin(safe) / safe)
    shape = np.where(z > 0, shape, 1.0)
    return kb_width / i0(beta) * shape


def trilinear_deapodisation(M: int, *, pad: int = PAD) -> np.ndarray:
    """The real-space transform of the hat window (linear interpolation) at ``x = i - M // 2``: sinc^2(x / N)."""
    x = np.arange(M) - M // 2
    return np.sinc(x / (pad * M)) ** 2


def as_cube(volume) -> np.ndarray:
    """A validated real cubic map (M, M, M), numpy order (z, y, x): ValueError/TypeError otherwise."""
    vol = np.asarray(volume)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"volume must be a cube (M, M, M) in numpy order (z, y, x); got shape {vol.shape}")
    if np.iscomplexobj(vol) or not np.issubdtype(vol.dtype, np.number):
        raise TypeError(f"volume must be a real array; got dtype {vol.dtype}")
    if not np.all(np.isfinite(vol)):
        raise ValueError("volume contains NaN or inf voxels")
    return vol


def prepare_reference(volume: np.ndarray, *, pad: int = PAD, kb_width: int = KB_WIDTH, kb_alpha: float = KB_ALPHA,
                      interpolation: str = "kb") -> PreparedReference:
    """SPARX ``prep_vol``: deapodise a map in real space, zero-pad it to N^3 (centred), 3-D FFT, centre.

    volume : real array (M, M, M), numpy order (z, y, x), centre voxel at M // 2; odd or even M.
    pad : oversampling (N = pad * M must be even; SPARX uses 2). kb_width, kb_alpha : the window (K = 6,
        alpha = 1.75 in SPARX; alpha must exceed 1 so the deapodisation has no zero inside the box).
    interpolation : "kb" (Kaiser-Bessel, K taps per axis) or "trilinear" (2 taps, deapodised by sinc^2).
    Returns a :class:`PreparedReference` (layout there). The map's centre voxel lands on N // 2 of the padded box
    (SPARX ``norm_pad``), which is the phase origin of the transform.
    """
    vol = as_cube(volume)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}; expected one of {INTERPOLATIONS}")
    m = vol.shape[0]
    _check_window(m, pad, kb_width, kb_alpha)
    n = pad * m
    if interpolation == "kb":
        d = kb_deapodisation(m, pad=pad, kb_width=kb_width, kb_alpha=kb_alpha)
    else:
        d = trilinear_deapodisation(m, pad=pad)
    padded = np.zeros((n, n, n))
    s = n // 2 - m // 2
    padded[s:s + m, s:s + m, s:s + m] = vol / (d[:, None, None] * d[None, :, None] * d[None, None, :])
    # ifftshift puts the map centre (N // 2) at index 0, the phase origin; fftshift centres the z and y axes.
    half_cube = np.fft.fftshift(scipy.fft.rfftn(np.fft.ifftshift(padded), workers=-1), axes=(0, 1))
    taps = kb_width if interpolation == "kb" else 2
    return PreparedReference(data=_add_halo(half_cube, taps // 2), M=m, N=n, pad=int(pad), kb_width=int(kb_width),
                             kb_alpha=float(kb_alpha), interpolation=interpolation, halo=taps // 2)


def sample_reference(ref: PreparedReference, freqs) -> np.ndarray:
    """Interpolate the prepared transform at arbitrary 3-D frequencies.

    ref : :class:`PreparedReference`; its ``interpolation`` picks the window (K = ``kb_width`` Kaiser-Bessel taps
        per axis, or 2 trilinear taps), separable over x, y, z.
    freqs : float array (..., 3), (u_x, u_y, u_z) in padded-grid units (module docstring), e.g. ``R.T @ k``.
    Returns complex128 of shape freqs.shape[:-1], approximating ``F(u / pad)``, the DFT of the original map at
    q = u / pad cycles per box. Points with |u| > N / 2 are 0; taps wrap periodically on the N^3 grid.
    """
    u = np.asarray(freqs, dtype=np.float64)
    if u.ndim < 1 or u.shape[-1] != 3:
        raise ValueError(f"freqs must have shape (..., 3) as (u_x, u_y, u_z); got {np.shape(freqs)}")
    if not np.all(np.isfinite(u)):
        raise ValueError("freqs contain NaN or inf")
    flat = u.reshape(-1, 3)
    out = np.zeros(len(flat), dtype=np.complex128)
    # |R.T k| = |k|: allow rounding of the rotation, so samples exactly at Nyquist stay in (as the kernel keeps them)
    inside = np.nonzero(np.einsum("pi,pi->p", flat, flat) <= (ref.N / 2) ** 2 * (1 + 1e-9))[0]
    block = max(1, _TAPS_PER_BLOCK // ref.taps ** 3)
    for start in range(0, len(inside), block):
        idx = inside[start:start + block]
        out[idx] = _interpolate(ref, flat[idx])
    return out.reshape(u.shape[:-1])


def section_grid(N: int) -> tuple[np.ndarray, np.ndarray]:
    """The frequencies of an N x N image's half transform (``np.fft.rfft2`` layout, FFT order).

    Returns (kx, ky), float64 arrays (N, N // 2 + 1) in padded-grid units (cycles per N pixels): row i holds
    ky = ``np.fft.fftfreq(N, 1/N)[i]`` (the image's y, rows), column j holds kx = j (x, columns).
    """
    ky = np.fft.fftfreq(N, d=1.0 / N)[:, None] * np.ones((1, N // 2 + 1))
    kx = np.fft.rfftfreq(N, d=1.0 / N)[None, :] * np.ones((N, 1))
    return kx, ky


def central_section(ref: PreparedReference, poses, kmax: float | None = None) -> np.ndarray:
    """The 2-D transforms of the projections at the given poses, on the padded image grid.

    ref : :class:`PreparedReference`. poses : float array (n, 5) or (5,), phi theta psi (degrees) sx sy (pixels)
        (:mod:`gpu_ali3d.geometry`). kmax : resolution limit in padded-grid units (default N / 2, Nyquist).
    Returns complex128 (n, N, N // 2 + 1) in the layout of :func:`section_grid` (rfft2 half plane, FFT order,
    k in cycles per N pixels = steps of 1/N cycles per original pixel). Values are the DFT of the N x N
    zero-padded projection *about its centre pixel* (N // 2, N // 2) (the original image's (M // 2, M // 2)):
    ``P(k) = F_ref(R.T @ (kx, ky, 0)) * exp(+2 pi i (kx sx + ky sy) / N)``, the shift phase translating the
    projection by (-sx, -sy). Multiply by ``(-1)^(kx + ky)`` to get ``np.fft.rfft2`` of the padded image.
    Samples with |k| > kmax are 0.
    """
    p = as_poses(poses)
    n = ref.N
    kmax = n / 2 if kmax is None else _check_kmax(kmax)
    kx, ky = section_grid(n)
    rot = rotation_matrix(p[:, 0], p[:, 1], p[:, 2])                                  # (n, 3, 3)
    keep = kx ** 2 + ky ** 2 <= kmax ** 2
    kxs, kys = kx[keep], ky[keep]
    out = np.zeros((len(p), n, n // 2 + 1), dtype=np.complex128)
    block = max(1, _SECTION_POINTS_PER_BLOCK // max(1, len(kxs)))
    for start in range(0, len(p), block):
        r, q = rot[start:start + block], p[start:start + block]
        # u = R.T @ (kx, ky, 0): u_j = R[0, j] kx + R[1, j] ky
        u = r[:, None, 0, :] * kxs[None, :, None] + r[:, None, 1, :] * kys[None, :, None]
        out[start:start + block, keep] = sample_reference(ref, u) * _shift_phase(kxs, kys, q[:, 3], q[:, 4], n)
    return out


def project_reference(ref: PreparedReference, poses, *, ctf: CTFParams | None = None, apix_A: float = 1.0,
                      kmax: float | None = None) -> np.ndarray:
    """Real-space projections through the gridding path (SPARX ``prgs``): section, CTF, shift, inverse FFT, crop.

    ref : :class:`PreparedReference` of an M^3 map. poses : float array (n, 5) or (5,) (:mod:`gpu_ali3d.geometry`).
    ctf : CTFParams of n particles (or one for all), or None. Evaluated on the padded grid, frequency
        k / (N apix_A) 1/Angstrom (:func:`gpu_ali3d.ctf.ctf_grid` of an N box), CTF(0) = +Q.
    apix_A : pixel size (Angstrom), for the CTF only. kmax : resolution limit, padded-grid units (default N / 2).
    Returns float64 (n, M, M), numpy order (y, x), image centre at (M // 2, M // 2): the N x N inverse transform
    cropped to the central M x M (SPARX ``depad``: first pixel N // 2 - M // 2).
    """
    p = as_poses(poses)
    check_ctf_arguments(ctf, len(p), apix_A, "poses")
    n, m = ref.N, ref.M
    spectrum = central_section(ref, p, kmax)
    if ctf is not None:
        spectrum *= ctf_grid(ctf, n, apix_A, half=True)
    kx, ky = section_grid(n)
    spectrum *= np.where((kx + ky) % 2 == 0, 1.0, -1.0)          # origin from the centre pixel N//2 to index 0
    images = np.fft.irfft2(spectrum, s=(n, n))
    s = n // 2 - m // 2
    return images[:, s:s + m, s:s + m].copy()


# ----------------------------------------------------------------------------------------------- helpers
def _interpolate(ref: PreparedReference, u: np.ndarray) -> np.ndarray:
    """Separable interpolation at points u (P, 3) (x, y, z; padded-grid units, |u| <= N/2): complex128 (P,).

    A point with u_x < 0 is replaced by -u and the result conjugated (Friedel). The taps of a point are then the
    K grid points j with |u - j| < K/2 on each axis (first tap floor(u - K/2) + 1), all inside the halo of
    ``ref.data``, so the K^3 values are read through flat indices without any wrapping or mirroring.
    """
    n, taps, h = ref.N, ref.taps, ref.halo
    flip = u[:, 0] < 0
    u = np.where(flip[:, None], -u, u)
    first = np.floor(u - 0.5 * taps).astype(np.int64) + 1                          # (P, 3)
    j = first[:, :, None] + np.arange(taps)                                        # (P, 3, taps)
    if ref.interpolation == "kb":
        w = kb_weights(u[:, :, None] - j, kb_width=ref.kb_width, kb_alpha=ref.kb_alpha, pad=ref.pad)
    else:
        w = np.clip(1.0 - np.abs(u[:, :, None] - j), 0.0, None)
    sz, sy, sx = ref.data.shape
    # flat index of data[N//2 + h + j_z, N//2 + h + j_y, h + j_x], as a sum of per-axis terms
    z_term = ((j[:, 2] + n // 2 + h) * (sy * sx))[:, :, None, None]
    y_term = ((j[:, 1] + n // 2 + h) * sx)[:, None, :, None]
    x_term = (j[:, 0] + h)[:, None, None, :]
    vals = ref.data.reshape(-1)[z_term + y_term + x_term]                          # (P, taps_z, taps_y, taps_x)
    w = w.astype(np.complex128)                                                    # separable contraction x, y, z
    out = np.einsum("pz,pz->p", np.einsum("pzy,py->pz", np.einsum("pzyx,px->pzy", vals, w[:, 0]), w[:, 1]), w[:, 2])
    return np.where(flip, np.conj(out), out)


def _add_halo(half_cube: np.ndarray, h: int) -> np.ndarray:
    """Centred half cube (N, N, N//2+1) -> the haloed layout of :attr:`PreparedReference.data`.

    z and y are extended periodically to [-N/2 - h, N/2 + h]; x columns -h..-1 and N/2+1..N/2+h are the Friedel
    mates ``conj F(-u_z, -u_y, -u_x)`` and ``conj F(-u_z, -u_y, N - u_x)`` (periodic in x as well).
    """
    n = half_cube.shape[0]
    rows = (np.arange(-n // 2 - h, n // 2 + h + 1) + n // 2) % n                  # centred index of each u
    ext = half_cube[rows][:, rows]                                                 # (N+2h+1, N+2h+1, N//2+1)
    mirrored = np.conj(ext[::-1, ::-1])                                            # value at (-u_z, -u_y)
    low = mirrored[:, :, h:0:-1]                                                   # u_x = -h..-1 <- -u_x = h..1
    high = mirrored[:, :, n // 2 - 1:n // 2 - 1 - h:-1]                            # u_x = N/2+1.. <- N/2-1..
    return np.ascontiguousarray(np.concatenate([low, ext, high], axis=2))


def _wrap(j: np.ndarray, n: int) -> np.ndarray:
    """Integer frequencies -> their periodic representative in [-n/2, n/2)."""
    return (j + n // 2) % n - n // 2


def _shift_phase(kx: np.ndarray, ky: np.ndarray, sx: np.ndarray, sy: np.ndarray, n: int) -> np.ndarray:
    """exp(+2 pi i (kx sx + ky sy) / N) for samples (S,) and poses (n,): (n, S); translates content by (-sx, -sy)."""
    return np.exp(2j * np.pi * (kx[None, :] * sx[:, None] + ky[None, :] * sy[:, None]) / n)


def _check_window(m, pad, kb_width, kb_alpha) -> None:
    if not isinstance(m, (int, np.integer)) or m < 2:
        raise ValueError(f"map side M must be an integer >= 2; got {m!r}")
    if not isinstance(pad, (int, np.integer)) or pad < 1:
        raise ValueError(f"pad must be a positive integer (SPARX uses 2); got {pad!r}")
    if (pad * m) % 2:
        raise ValueError(f"the padded side N = pad * M = {pad * m} must be even; use pad=2")
    if not isinstance(kb_width, (int, np.integer)) or kb_width < 2:
        raise ValueError(f"kb_width must be an integer >= 2 (padded-grid samples; SPARX uses 6); got {kb_width!r}")
    if not (np.isfinite(kb_alpha) and kb_alpha > 1.0):
        raise ValueError(f"kb_alpha={kb_alpha} puts a zero of the deapodisation inside the box; use kb_alpha > 1 "
                         "(SPARX uses 1.75)")


def _check_kmax(kmax) -> float:
    k = float(kmax)
    if not (np.isfinite(k) and k > 0):
        raise ValueError(f"kmax must be a positive frequency in padded-grid units (cycles per N pixels); got {kmax}")
    return k
