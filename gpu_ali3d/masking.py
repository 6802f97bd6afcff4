"""The adaptive mask: the particle's own envelope, made anew from each iteration's map (``--automask``).

SPARX's local_ali3d masks its reference and its FSC with a sphere of radius ou (box // 2 - 2 by default). Around a
small particle that sphere holds mostly solvent: at box 128, a 107 kDa GPCR complex (radius about 45 pixels)
fills about 6 % of the box and the sphere 50 %, so most of the reference's voxels carry only noise into every
projection, and the FSC measured over them understates the resolution and lets the tanh filter cut too low.
:func:`adaptive_mask` keeps what the map itself shows to be particle, as cryoSPARC's dynamic masks and RELION's
solvent masks do: the map low-passed to :data:`LOWPASS_A`, thresholded at a fraction of its maximum, its
connected pieces of at least :data:`MIN_PIECE` of the largest one's size grown by :data:`DILATE_PX` pixels and
given an :data:`EDGE_PX`-pixel raised-cosine edge, never beyond the sphere. refine uses it, where no mask file is given, for the FSC and as the user function's mask.

Measured (bench/bench_automask.py; gauge-removed median errors after 5 iterations with --CTF on 1,000 GPCR
particles at SNR 0.05, box 128; after 3 on 2,000 70S particles at SNR 0.08, box 64): see bench/README.md.
"""
from __future__ import annotations

import numpy as np

#: Resolution (Angstrom) of the low-pass that the threshold is applied to: the particle's envelope, not its detail.
LOWPASS_A = 15.0
#: Pixels the thresholded envelope is grown by (Euclidean distance), so no density at its rim is cut off.
DILATE_PX = 5.0
#: Pieces of the thresholded map smaller than this fraction of the largest are left out (noise specks).
MIN_PIECE = 0.01
#: Width (pixels) of the raised-cosine fall-off outside the grown envelope.
EDGE_PX = 6.0


def adaptive_mask(vol: np.ndarray, apix_A: float, sphere: np.ndarray, *, threshold: float,
                  lowpass_A: float = LOWPASS_A, dilate_px: float = DILATE_PX, edge_px: float = EDGE_PX,
                  binning: int | None = None) -> np.ndarray:
    """The particle's envelope in ``vol`` as a soft mask, float64 of vol's shape, values in [0, 1].

    vol : real (M, M, M) map, numpy order (z, y, x). apix_A : its pixel size (Angstrom). sphere : the outer mask
    (refine's sphere of radius ou, float (M, M, M)); the result is never larger than it, and voxels where it is
    <= 0.5 are never part of the envelope. threshold : fraction (0 < threshold < 1) of the low-passed map's
    largest value inside the sphere above which a voxel is particle.

    The work is done on the map binned by b (block means; b the largest divisor of M with b apix_A <= lowpass_A /
    3, so the binned grid still resolves the low-pass; ``binning`` gives b instead, a divisor of M) and the mask
    brought back to M^3 by linear interpolation: at box 128 and 1.5 A/px that is 0.2 s instead of 1 s.

    Steps: the map low-passed by :func:`gpu_ali3d.resolution.filt_tanl` at ``apix_A / lowpass_A`` cycles per pixel
    (fall-off 0.2; no filtering where that is beyond Nyquist); voxels above the threshold inside the sphere; of
    those the 6-connected pieces of at least :data:`MIN_PIECE` times the largest one's voxels (noise specks apart
    from the particle are dropped; a separate domain is kept); then, with d the Euclidean distance (pixels) to
    them, 1 where d <= dilate_px, ``0.5 (1 + cos(pi (d - dilate_px) /
    edge_px))`` up to dilate_px + edge_px and 0 beyond; finally multiplied by ``sphere``. A map without a positive
    maximum inside the sphere (nothing to threshold) gives ``sphere`` itself.
    """
    from scipy import ndimage

    from .resolution import filt_tanl

    vol = np.asarray(vol, dtype=np.float64)
    sphere = np.asarray(sphere, dtype=np.float64)
    if vol.ndim != 3 or sphere.shape != vol.shape:
        raise ValueError(f"adaptive_mask: map {vol.shape} and sphere {sphere.shape} must be 3-D arrays of one shape")
    if not 0 < threshold < 1:
        raise ValueError(f"--automask {threshold}: the threshold is a fraction of the map's maximum, 0 < t < 1 "
                         "(or 0 for the sphere alone)")
    if not (np.isfinite(apix_A) and apix_A > 0):
        raise ValueError(f"adaptive_mask: pixel size {apix_A!r} must be positive (Angstrom)")
    m = vol.shape[0]
    b = max([f for f in range(1, m + 1) if m % f == 0 and f * apix_A <= lowpass_A / 3] or [1]) \
        if binning is None else int(binning)
    if b < 1 or m % b:
        raise ValueError(f"adaptive_mask: binning {binning!r} must be a positive divisor of the box {m}")
    small, inside = _bin(vol, b), _bin(sphere, b) > 0.5
    cutoff = b * apix_A / lowpass_A
    low = filt_tanl(small, cutoff, 0.2) if cutoff < 0.5 else small
    peak = float(low[inside].max()) if inside.any() else 0.0
    if not peak > 0:
        return sphere.copy()
    labels, count = ndimage.label(inside & (low > threshold * peak))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    core = (sizes >= MIN_PIECE * sizes.max())[labels] & (labels > 0)
    # pixels of the M^3 grid: b per binned pixel, less the (b - 1) / 2 from a block's centre to its outer pixels
    d = np.maximum(b * ndimage.distance_transform_edt(~core) - 0.5 * (b - 1), 0.0)
    t = np.clip((d - dilate_px) / edge_px, 0.0, 1.0) if edge_px > 0 else (d > dilate_px).astype(np.float64)
    soft = 0.5 * (1.0 + np.cos(np.pi * t))
    if b > 1:
        soft = np.clip(ndimage.zoom(soft, b, order=1, mode="nearest", grid_mode=True), 0.0, 1.0)
    return soft * sphere


def _bin(vol: np.ndarray, b: int) -> np.ndarray:
    """Means of b x b x b blocks (b divides the side)."""
    if b == 1:
        return vol
    m = vol.shape[0] // b
    return vol.reshape(m, b, m, b, m, b).mean(axis=(1, 3, 5))
