"""Resolution measures and the filters built on them: FSC, masks, the tanh low-pass fitted to an FSC, centring.

A numpy/float64 reference of SPARX's ``pap_statistics.fsc``/``fsc_mask``, ``filter.fit_tanh``/``filt_tanl``,
``utilities.model_circle`` and ``EMData::phase_cog`` + ``fundamentals.fshift``, written from what those compute
(EMAN2 sources: ``libEM/sparx/emdata_sparx.cpp`` ``calc_fourier_shell_correlation`` and ``phase_cog``,
``libEM/sparx/fourierfilter.cpp`` ``TANH_LOW_PASS`` and ``SHIFT``, ``libEM/sparx/rsconvolution.cpp``
``filt_dilation_``/``filt_erosion_``, ``libEM/processor.cpp`` ``testimage.circlesphere``).

Conventions (as :mod:`gpu_ali3d.projection`): a volume is a real numpy array (z, y, x), an image (y, x); the
centre voxel is index n // 2 on each axis. Vectors of shifts and centres are given in (x, y, z) order
(x = the last numpy axis), in pixels. Frequencies are absolute, in cycles per pixel (0 .. 0.5). Fourier indices
follow SPARX: on an even axis the Nyquist index n/2 counts as positive.

Where SPARX computes a discrete choice in float32 (which Fourier voxel falls in which FSC shell, which voxel is
inside a ``model_circle``) we evaluate the same float32 expression, so the choice is SPARX's to the voxel; all
sums, transforms and filters are float64.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

#: Frequency and fall-off fit_tanh returns when the full-data FSC never drops below 0.5 (SPARX's values).
TANH_DEFAULT = (0.4, 0.2)


class FSCCurve(NamedTuple):
    """SPARX's three FSC columns, each float64 (k,)."""
    freq: np.ndarray       # absolute frequency, cycles per pixel: shell index / (2 * inc); 0 .. 0.5
    fsc: np.ndarray        # Fourier shell correlation
    n_voxels: np.ndarray   # Fourier coefficients in the shell, each Friedel pair counted twice


class FSCResolution(NamedTuple):
    freq_px: float         # cycles per pixel where the FSC crosses the threshold
    resolution_A: float    # apix_A / freq_px (Angstrom; pixels when apix_A = 1); inf when freq_px = 0


# ------------------------------------------------------------------------------------------------------- FSC
def fsc(a: np.ndarray, b: np.ndarray, *, w: float = 1.0) -> FSCCurve:
    """Fourier shell (3-D) or ring (2-D) correlation, exactly as SPARX ``fsc`` (``calc_fourier_shell_correlation``).

    a, b : real arrays of one shape, (z, y, x) or (y, x); any sizes >= 2 (odd or even, not necessarily cubic).
    w : shell width in Fourier pixels.

    Shells: with ``n2 = n // 2`` per axis and Fourier indices k (Nyquist positive), a coefficient's radius is
    ``rho = 0.5 * sqrt(sum (k_i / n2_i)^2)`` (for an even cube: |k| / n cycles per pixel; for an odd cube
    |k| / (n - 1)) and its shell is ``round(2 * inc * rho)`` with ``inc = round(nx2 / w)``, rounding halves away
    from zero; shells 0 .. inc are kept (the corners beyond are dropped). Only the half transform is visited
    (kx >= 0; on the kx = 0 plane only kz > 0, or kz = 0 and ky >= 0), each coefficient counting 2 in
    ``n_voxels`` (so the DC shell has 2). FSC = sum Re(A conj B) / sqrt(sum |A|^2 sum |B|^2); freq = shell / (2 inc).
    The length is the number of shells holding any coefficient (inc + 1 for w = 1). A shell where either map has
    no power is left out and the curve is padded at its end with rows (0, 0, 0), as SPARX does.
    """
    a = _real_array(a, "a")
    b = _real_array(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"fsc: maps of different shapes {a.shape} and {b.shape}; resample one to the other's box")
    if not (np.isfinite(w) and w > 0):
        raise ValueError(f"fsc: shell width w={w!r} must be a positive number of Fourier pixels (SPARX uses 1)")
    shape3 = a.shape if a.ndim == 3 else (1,) + a.shape
    shell, inc = _fsc_shells(shape3, w)
    fa = np.fft.rfftn(a.reshape(shape3))
    fb = np.fft.rfftn(b.reshape(shape3))
    keep = (shell >= 0) & (shell <= inc)              # shell is -1 where a Friedel mate is skipped
    idx = shell[keep]
    cross = np.bincount(idx, (fa.real * fb.real + fa.imag * fb.imag)[keep], minlength=inc + 1)
    pa = np.bincount(idx, (fa.real ** 2 + fa.imag ** 2)[keep], minlength=inc + 1)
    pb = np.bincount(idx, (fb.real ** 2 + fb.imag ** 2)[keep], minlength=inc + 1)
    count = 2.0 * np.bincount(idx, minlength=inc + 1)

    n_rows = int(np.count_nonzero(count > 0))
    valid = (count > 0) & (pa > 0) & (pb > 0)
    out = np.zeros((3, n_rows))
    i = np.flatnonzero(valid)
    out[0, :i.size] = i / (2.0 * inc)
    out[1, :i.size] = cross[i] / np.sqrt(pa[i] * pb[i])
    out[2, :i.size] = count[i]
    return FSCCurve(out[0], out[1], out[2])


def fsc_mask(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, *, w: float = 1.0) -> FSCCurve:
    """FSC of two maps after SPARX's ``fsc_mask`` preparation.

    mask : array of the maps' shape (soft or binary), or None for ``model_circle(n // 2)`` (a sphere of radius
    nx // 2, see :func:`sphere_mask`). Each map has its mean over :func:`border_shell` (mask) subtracted, is
    multiplied by the mask itself (not the binarised one), and then goes through :func:`fsc`.
    """
    a = _real_array(a, "a")
    b = _real_array(b, "b")
    if mask is None:
        mask = _model_circle(a.shape[-1] // 2, a.shape)
    mask = _real_array(mask, "mask")
    if mask.shape != a.shape or b.shape != a.shape:
        raise ValueError(f"fsc_mask: maps {a.shape}, {b.shape} and mask {mask.shape} must have one shape")
    shell = border_shell(mask)
    if not shell.any():
        raise ValueError("fsc_mask: the mask has no border (it is empty or fills the box); give a mask with an edge")
    return fsc((a - a[shell].mean()) * mask, (b - b[shell].mean()) * mask, w=w)


def border_shell(mask: np.ndarray) -> np.ndarray:
    """The voxels fsc_mask averages over: dilation minus erosion of the mask binarised at 0.5 (bool array).

    Binarised as SPARX ``threshold.binary``: 1 where mask >= 0.5. Both operations use SPARX's default structuring
    element ``model_circle(2, 5, 5, 5)`` (``model_circle(2, 5, 5)`` for images): a ball of radius 2 voxels, 33
    voxels. Dilation ignores what lies beyond the box; erosion treats the outside of the box as inside the mask
    (SPARX ``filt_erosion_`` only erodes from zero voxels inside the box). So the shell runs from about two
    voxels inside the edge to about two voxels outside it: on a sphere of radius 12 it holds 3.4 voxels per unit
    area (the ball's lattice points reach less than 2 along diagonals).
    """
    m = _real_array(mask, "mask") >= 0.5
    offsets = np.argwhere(_model_circle(2, (5,) * m.ndim) > 0) - 2
    dilated = _dilate(m, offsets)
    eroded = ~_dilate(~m, offsets)
    return dilated & ~eroded


def sphere_mask(M: int, radius: float, *, soft_edge: float = 0.0) -> np.ndarray:
    """Spherical mask, float64 (M, M, M), centre voxel M // 2 on each axis.

    soft_edge = 0 gives SPARX ``model_circle(radius, M, M, M)`` to the voxel: 1 where, in float32,
    ``dx^2/r^2 + dy^2/r^2 + dz^2/r^2 <= 1``, else 0. soft_edge > 0 (our addition; SPARX's masks are sharp)
    keeps those voxels at 1 and adds a raised-cosine fall-off ``0.5 (1 + cos(pi (d - radius) / soft_edge))`` for
    distances radius < d < radius + soft_edge.
    """
    return _mask(M, radius, soft_edge, ndim=3)


def circle_mask(M: int, radius: float, *, soft_edge: float = 0.0) -> np.ndarray:
    """Circular mask for images, float64 (M, M), centre pixel M // 2; as :func:`sphere_mask` in 2-D."""
    return _mask(M, radius, soft_edge, ndim=2)


# --------------------------------------------------------------------------------------- tanh filter and fit
def fit_tanh(fsc_curve, low: float = 0.1) -> tuple[float, float]:
    """Cut-off and fall-off of a tanh low-pass fitted to the FSC of two half maps (SPARX ``filter.fit_tanh``).

    fsc_curve : (freq, fsc, n_voxels) as :func:`fsc` returns; fsc is of half data sets. Not modified (SPARX edits
    the caller's list in place: the zeroed tail and the sign of the first value).

    Steps, as SPARX: the full-data FSC is ``2 r / (1 + r)``. From the first point i >= 1 where it is < ``low``, r is
    set to 0 (that point and all after it). The start cut-off is freq[i - 1] for the first i in 1 .. k-2 with full
    FSC < 0.5; if there is none (the last point is not searched), return :data:`TANH_DEFAULT` (0.4, 0.2) without
    fitting. Otherwise r[0] is made non-negative and Nelder-Mead (SPARX's ``utilities.amoeba``, reproduced here
    step by step: start (cut-off, 0.1), steps (0.05, 0.05), ftol = xtol = 1e-4, at most 500 steps) maximises
    ``-sum_i (full_i - T(freq_i))^2`` over all points, with T the :func:`filt_tanl` response
    ``0.5 (tanh(pi (f + c) / (2 a c)) - tanh(pi (f - c) / (2 a c)))``; a vertex with c = 0 or a = 0 scores 0,
    the best possible score, so a simplex step landing exactly on a = 0 (the start 0.1 minus two 0.05 steps)
    ends there: SPARX then returns a = 0.0, and so do we (filt_tanl treats it as a sharp cut).
    Returns (cutoff, falloff), plain floats, unbounded (the fit is not constrained to positive values).
    """
    freq = [float(v) for v in np.asarray(fsc_curve[0], dtype=np.float64)]
    r = [float(v) for v in np.asarray(fsc_curve[1], dtype=np.float64)]
    if len(freq) != len(r) or len(freq) < 2:
        raise ValueError(f"fit_tanh: need an FSC curve of >= 2 points with matching columns; got {len(freq)} "
                         f"frequencies and {len(r)} FSC values")
    setzero = False
    for i in range(1, len(r)):
        if not setzero and 2.0 * r[i] / (1.0 + r[i]) < low:
            setzero = True
        if setzero:
            r[i] = 0.0
    start = -1.0
    for i in range(1, len(r) - 1):
        if 2.0 * r[i] / (1.0 + r[i]) < 0.5:
            start = freq[i - 1]
            break
    if start < 0.0:
        return TANH_DEFAULT
    if r[0] < 0.0:
        r[0] = -r[0]
    full = [2.0 * v / (1.0 + v) for v in r]

    def misfit(args):
        c, fall = args
        if c == 0 or fall == 0:
            return 0.0
        v = 0.0
        for f, fs in zip(freq, full):
            model = 0.5 * (math.tanh(math.pi * (f + c) / 2.0 / fall / c)
                           - math.tanh(math.pi * (f - c) / 2.0 / fall / c))
            qt = fs - model
            v -= qt * qt
        return v

    best, _, _ = _amoeba([start, 0.1], [0.05, 0.05], misfit)
    return float(best[0]), float(best[1])


def tanl_response(freq, cutoff: float, falloff: float) -> np.ndarray:
    """The tanh low-pass transfer function at absolute frequencies freq (cycles per pixel), float64.

    H(s) = 0.5 (tanh(k (s + c)) - tanh(k (s - c))), k = pi / (2 falloff c). H(c) = 0.5 tanh(pi / falloff)
    (0.5 for small fall-offs) and H(0) = tanh(pi / (2 falloff)). The sign of c does not matter; a negative
    fall-off negates H (as in SPARX, which evaluates the same formula without checks).
    falloff = 0 (which fit_tanh can return, see there) gives the limit falloff -> 0+: 1 below c, 0.5 at c, 0 above.
    SPARX divides by zero there and gets the same values except NaN exactly at s = c.
    """
    s = np.asarray(freq, dtype=np.float64)
    if not (np.isfinite(cutoff) and np.isfinite(falloff)) or cutoff == 0:
        raise ValueError(f"tanh low-pass: cutoff={cutoff!r}, falloff={falloff!r}: need a finite non-zero cut-off "
                         "(absolute frequency, e.g. 0.25) and a finite fall-off (e.g. 0.1). A zero cut-off from "
                         "fit_tanh means the FSC fell below 0.5 at its first shell: the half maps do not agree")
    if falloff == 0:
        c = abs(cutoff)
        return np.where(s < c, 1.0, np.where(s == c, 0.5, 0.0))
    k = (math.pi / 2.0) / falloff / cutoff
    return 0.5 * (np.tanh(k * (s + cutoff)) - np.tanh(k * (s - cutoff)))


def tanl_band_limit(cutoff: float, falloff: float, level: float = 0.01) -> float:
    """The frequency (cycles per pixel) above which :func:`tanl_response` stays below ``level``: where a map
    filtered by the tanh low-pass has (practically) no signal left.

    Above the cut-off H(s) ~ 0.5 (1 - tanh(k (s - c))), k = pi / (2 falloff c), so the limit is
    ``|c| + atanh(1 - 2 level) / |k|``: about |c| (1 + 1.46 |falloff|) for the default 1 %. The fall-off is relative
    to the cut-off (the transition is about 2 falloff c / pi wide), so this is much closer to c than c + falloff.
    falloff = 0 (a sharp cut) gives |c|. 0 < level < 0.5.
    """
    if not (np.isfinite(cutoff) and np.isfinite(falloff)) or cutoff == 0:
        raise ValueError(f"tanh low-pass: cutoff={cutoff!r}, falloff={falloff!r}: need a finite non-zero cut-off")
    if not 0 < level < 0.5:
        raise ValueError(f"level={level!r} must be in (0, 0.5): the response is 0.5 at the cut-off")
    c = abs(cutoff)
    return c + math.atanh(1.0 - 2.0 * level) * 2.0 * abs(falloff) * c / math.pi


def filt_tanl(vol: np.ndarray, cutoff: float, falloff: float, *, pad: bool = False) -> np.ndarray:
    """SPARX ``filt_tanl``: multiply the map's Fourier transform by :func:`tanl_response`.

    vol : real (z, y, x) or (y, x). cutoff : absolute frequency (cycles per pixel) where the response is about
    0.5; falloff : width, relative to cutoff (0 gives a sharp cut, see :func:`tanl_response`). The frequency of
    index (jx, jy, jz) is ``sqrt((jx/nx)^2 + (jy/ny)^2 + (jz/nz)^2)`` on the (possibly padded) grid; rfftn,
    multiply, irfftn.
    pad=False (what ref_ali3d uses): no padding. pad=True: as SPARX ``dopad``, the map is first put in a box
    twice as large filled with the mean of the map's outermost one-voxel layer (not zero), at offset
    n // 2 + n % 2 per axis, and cut out from there afterwards.
    Returns float64 of vol's shape.
    """
    vol = _real_array(vol, "vol")
    tanl_response(0.0, cutoff, falloff)               # validates the parameters before any work
    work, starts = vol, None
    if pad:
        layer = np.ones(vol.shape, dtype=bool)
        layer[tuple(slice(1, n - 1) for n in vol.shape)] = False
        starts = [n // 2 + n % 2 for n in vol.shape]
        work = np.full(tuple(2 * n for n in vol.shape), vol[layer].mean())
        work[tuple(slice(s, s + n) for s, n in zip(starts, vol.shape))] = vol
    s = np.sqrt(sum(g ** 2 for g in _freq_grid(work.shape)))
    out = np.fft.irfftn(np.fft.rfftn(work) * tanl_response(s, cutoff, falloff), s=work.shape,
                        axes=tuple(range(work.ndim)))
    if pad:
        out = out[tuple(slice(s0, s0 + n) for s0, n in zip(starts, vol.shape))].copy()
    return out


# ----------------------------------------------------------------------------------------------------- centring
def phase_centre_of_gravity(vol: np.ndarray) -> np.ndarray:
    """SPARX ``EMData::phase_cog``: the map's centre from the phase of the first Fourier harmonic of each profile.

    For each axis the map is summed over the other axes to a profile p(i), i = 0 .. n-1, and
    ``c = angle(sum_i p(i) exp(+2 pi i i / n)) * n / (2 pi)`` with the angle taken in [0, 2 pi), minus n // 2.
    Returns float64 (3,) (x, y, z) for a volume, (2,) (x, y) for an image, in pixels relative to the centre voxel
    n // 2, in [-n // 2, n - n // 2). Sign: content moved by +d (``shift_volume(v, d)``) moves the result by +d;
    ``shift_volume(v, -phase_centre_of_gravity(v))`` is what centring does. (SPARX also returns the rounded
    values as a second half of its list; they are not used by ref_ali3d's centring.)
    """
    vol = _real_array(vol, "vol")
    out = []
    for axis in range(vol.ndim - 1, -1, -1):          # x first: the last numpy axis
        n = vol.shape[axis]
        profile = vol.sum(axis=tuple(a for a in range(vol.ndim) if a != axis))
        phase = 2.0 * math.pi * np.arange(n) / n
        angle = math.atan2(float(np.dot(np.sin(phase), profile)), float(np.dot(np.cos(phase), profile)))
        if angle < 0.0:
            angle += 2.0 * math.pi
        out.append(angle * n / (2.0 * math.pi) - n // 2)
    return np.array(out)


def shift_volume(vol: np.ndarray, shift) -> np.ndarray:
    """Translate a map by ``shift`` pixels, (x, y, z) order ((x, y) for an image), by a Fourier phase ramp.

    As SPARX ``fshift``: the half transform is multiplied by ``exp(-2 pi i (sx jx / nx + sy jy / ny + sz jz / nz))``
    with the Nyquist index counted positive, then transformed back (irfftn), so content at r moves to r + shift
    (circularly). Integer shifts equal ``np.roll``; for non-integer shifts the Nyquist planes keep only what a
    real inverse transform can hold. Returns float64 of vol's shape.
    """
    vol = _real_array(vol, "vol")
    shift = np.asarray(shift, dtype=np.float64).reshape(-1)
    if shift.size != vol.ndim or not np.all(np.isfinite(shift)):
        raise ValueError(f"shift_volume: shift {shift.tolist()} must be {vol.ndim} finite numbers in (x, y"
                         f"{', z' if vol.ndim == 3 else ''}) order for a map of shape {vol.shape}")
    grids = _freq_grid(vol.shape)                      # numpy axis order, cycles per pixel
    arg = sum(g * s for g, s in zip(grids, shift[::-1]))
    return np.fft.irfftn(np.fft.rfftn(vol) * np.exp(-2j * math.pi * arg), s=vol.shape,
                          axes=tuple(range(vol.ndim)))


def fsc_resolution(freq, fsc_values, threshold: float = 0.143, *, apix_A: float = 1.0,
                   interpolate: bool = True) -> FSCResolution:
    """Where an FSC curve first drops below ``threshold`` (0.5, 0.143, ...), in cycles per pixel and Angstrom.

    The search starts at the second point (the first is the DC term) and ignores trailing padding rows of
    :func:`fsc` (freq 0 after the first row). interpolate=True: the crossing is interpolated linearly between
    the last point at or above the threshold and the first point below it; False: the frequency of the first
    point below. If the curve never drops below, the last frequency is returned (resolution limited by the box).
    This is a report, not part of SPARX's refinement (fit_tanh chooses the filter).
    """
    f = np.asarray(freq, dtype=np.float64).reshape(-1)
    c = np.asarray(fsc_values, dtype=np.float64).reshape(-1)
    if f.size != c.size or f.size < 2:
        raise ValueError(f"fsc_resolution: need >= 2 points with matching columns; got {f.size} and {c.size}")
    if not apix_A > 0:
        raise ValueError(f"fsc_resolution: apix_A={apix_A!r} must be a positive pixel size in Angstrom")
    n = f.size
    pad = np.flatnonzero(f[1:] == 0.0)
    if pad.size:
        n = int(pad[0]) + 1
    below = np.flatnonzero(c[1:n] < threshold)
    if below.size == 0:
        fx = float(f[n - 1])
    else:
        i = int(below[0]) + 1
        fx = float(f[i])
        if interpolate and c[i - 1] != c[i]:
            t = (c[i - 1] - threshold) / (c[i - 1] - c[i])
            fx = float(f[i - 1] + t * (f[i] - f[i - 1]))
    return FSCResolution(fx, apix_A / fx if fx > 0 else math.inf)


def fsc_text(curve) -> str:
    """The ``resolution*`` file text SPARX writes: one line per shell, freq, fsc, n as ``"  %12f"`` each."""
    return "".join("  %12f  %12f  %12f\n" % (f, c, n) for f, c, n in zip(*(np.asarray(x) for x in curve[:3])))


# ------------------------------------------------------------------------------------------------- helpers
def _real_array(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if np.iscomplexobj(x) or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
                                  or x.dtype == bool):
        raise TypeError(f"{name}: expected a real array, got dtype {x.dtype}")
    if x.ndim not in (2, 3) or min(x.shape) < 2:
        raise ValueError(f"{name}: expected an image (y, x) or a volume (z, y, x) with sides >= 2, got shape {x.shape}")
    return x.astype(np.float64, copy=False)


def _fourier_index(n: int) -> np.ndarray:
    """Fourier indices of a full axis of length n in FFT order, Nyquist (n even) positive: 0..n//2, then negative."""
    i = np.arange(n)
    return np.where(i > n // 2, i - n, i)


def _freq_grid(shape) -> list[np.ndarray]:
    """Broadcastable frequency arrays (cycles per pixel), numpy axis order, for the rfftn layout of ``shape``."""
    grids = []
    for axis, n in enumerate(shape):
        k = np.arange(n // 2 + 1) if axis == len(shape) - 1 else _fourier_index(n)
        view = [1] * len(shape)
        view[axis] = k.size
        grids.append((k / n).reshape(view))
    return grids


def _fsc_shells(shape3, w: float) -> tuple[np.ndarray, int]:
    """Shell index of each rfftn coefficient of a (nz, ny, nx) map, -1 for skipped Friedel mates; and inc.

    The float32 arithmetic mirrors calc_fourier_shell_correlation so that borderline voxels land where SPARX
    puts them.
    """
    f32 = np.float32
    nz, ny, nx = shape3
    nx2, ny2, nz2 = nx // 2, ny // 2, nz // 2
    dx2 = f32(1) / f32(nx2) / f32(nx2)
    dy2 = f32(1) / f32(ny2) / f32(ny2)
    dz2 = f32(1) / f32(max(nz2, 1)) / f32(max(nz2, 1))
    inc = int(_round_f32(f32(nx2) / f32(w)))
    kz = _fourier_index(nz)[:, None, None]
    ky = _fourier_index(ny)[None, :, None]
    kx = np.arange(nx // 2 + 1)[None, None, :]
    argy = (kz * kz).astype(f32) * dz2 + (ky * ky).astype(f32) * dy2
    rho = f32(0.5) * np.sqrt(argy + (kx * kx).astype(f32) * dx2)
    shell = _round_f32(f32(2 * inc) * rho).astype(np.int64)
    visited = (kx > 0) | ((kz >= 0) & ((ky >= 0) | (kz != 0)))
    return np.where(visited, shell, -1), inc


def _round_f32(x):
    """Util::round on float32 values >= 0: int(x + 0.5f), the sum rounded to float32 first."""
    return np.floor(np.asarray(x, dtype=np.float32) + np.float32(0.5))


def _model_circle(radius: float, shape) -> np.ndarray:
    """SPARX model_circle (testimage.circlesphere, fill 1) of any 2-D/3-D shape, float64 0/1, float32 test."""
    f32 = np.float32
    r2 = f32(radius) * f32(radius)
    total = np.zeros(shape, dtype=f32)
    for axis, n in enumerate(reversed(shape)):       # x, y, z: SPARX adds the terms in this order
        d = np.abs(np.arange(n, dtype=f32) - f32(n // 2))
        view = [1] * len(shape)
        view[len(shape) - 1 - axis] = n
        total = total + ((d * d) / r2).reshape(view)
    return (total <= f32(1)).astype(np.float64)


def _mask(M: int, radius: float, soft_edge: float, ndim: int) -> np.ndarray:
    if isinstance(M, bool) or not isinstance(M, (int, np.integer)) or M < 2:
        raise ValueError(f"mask box M={M!r} must be an integer >= 2")
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"mask radius={radius!r} must be a positive number of pixels (e.g. ou = M // 2 - 2)")
    if not (np.isfinite(soft_edge) and soft_edge >= 0):
        raise ValueError(f"mask soft_edge={soft_edge!r} must be >= 0 pixels (0 gives SPARX's sharp model_circle)")
    shape = (int(M),) * ndim
    mask = _model_circle(radius, shape)
    if soft_edge > 0:
        axis = np.arange(M) - M // 2
        d = np.sqrt(sum(g ** 2 for g in np.meshgrid(*([axis] * ndim), indexing="ij")))
        edge = (mask == 0) & (d < radius + soft_edge)
        mask[edge] = 0.5 * (1.0 + np.cos(math.pi * (d[edge] - radius) / soft_edge))
    return mask


def _dilate(m: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Binary dilation by the structuring element given as integer offsets; nothing enters from beyond the box."""
    out = np.zeros_like(m)
    for off in offsets:
        dst = tuple(slice(max(o, 0), n + min(o, 0)) for o, n in zip(off, m.shape))
        src = tuple(slice(max(-o, 0), n + min(-o, 0)) for o, n in zip(off, m.shape))
        out[dst] |= m[src]
    return out


def _amoeba(var, scale, func, ftol: float = 1e-4, xtol: float = 1e-4, itmax: int = 500):
    """Maximise func by SPARX's ``utilities.amoeba`` (Metcalf's simplex), step for step. Returns (x, f, steps).

    Vertices: var, and var + scale[i] e_i. Each step: best and worst vertices (first index wins ties), centroid c of
    all but the worst; stop when the relative range |f_best - f_worst| / ((|f_best| + |f_worst|) / 2) < ftol and the
    mean of |c - worst| / scale < xtol, or after itmax steps. Reflect r = 2c - worst. If f(r) <= f(worst): move
    every vertex but the best and worst halfway to the best and take r = (best + worst) / 2 instead. Else if
    f(r) >= f(best): try e = 3c - 2 worst and keep the better. The new point replaces the worst.
    """
    nvar = len(var)
    simplex = [list(var)] + [[v + (scale[j] if j == i else 0.0) for j, v in enumerate(var)] for i in range(nvar)]
    fvalue = [func(p) for p in simplex]
    iteration = 0
    while True:
        best = worst = 0
        for i in range(nvar + 1):
            if fvalue[i] > fvalue[best]:
                best = i
            if fvalue[i] < fvalue[worst]:
                worst = i
        centre = [0.0] * nvar
        for i in range(nvar + 1):
            if i != worst:
                for j in range(nvar):
                    centre[j] += simplex[i][j]
        centre = [c / nvar for c in centre]
        simscale = sum(abs(centre[j] - simplex[worst][j]) / scale[j] for j in range(nvar)) / nvar
        fscale = (abs(fvalue[best]) + abs(fvalue[worst])) / 2.0
        frange = abs(fvalue[best] - fvalue[worst]) / fscale if fscale != 0.0 else 0.0
        if ((ftol <= 0.0 or frange < ftol) and (xtol <= 0.0 or simscale < xtol)) or (itmax and iteration >= itmax):
            return simplex[best], fvalue[best], iteration
        new = [2.0 * centre[j] - simplex[worst][j] for j in range(nvar)]
        fnew = func(new)
        if fnew <= fvalue[worst]:
            for i in range(nvar + 1):
                if i != best and i != worst:
                    simplex[i] = [0.5 * simplex[best][j] + 0.5 * simplex[i][j] for j in range(nvar)]
                    fvalue[i] = func(simplex[i])
            new = [0.5 * simplex[best][j] + 0.5 * simplex[worst][j] for j in range(nvar)]
            fnew = func(new)
        elif fnew >= fvalue[best]:
            expanded = [3.0 * centre[j] - 2.0 * simplex[worst][j] for j in range(nvar)]
            fexp = func(expanded)
            if fexp > fnew:
                new, fnew = expanded, fexp
        simplex[worst] = new
        fvalue[worst] = fnew
        iteration += 1
