"""The images' noise power spectrum, from the pixels outside the particle mask: what whitens the objective.

The background of a particle image (the pixels beyond the mask of radius ou) holds the noise and little of the
particle, so its power per Fourier ring, averaged over many images, estimates the noise spectrum of the data.
Dividing every Fourier sample of the data by the square root of that power (and the projection with it: the
whitened objective of :mod:`gpu_ali3d.score`) weights each ring of the correlation by its noise, as RELION's
likelihood weights it by 1 / sigma^2 of the ring.

Conventions: rings of the M x M image's Fourier grid, ring r holding the samples with round(|k|) = r, |k| in
Fourier pixels of the M-grid (cycles per M pixels, 0 .. M/2 along the axes; rings beyond M/2 are the corners).
The spectrum is a shape only: each image is normalised to unit background variance before it is summed (a
per-image scale cancels in the normalised correlation), and the result is divided by its mean over rings 1..M/2.
"""
from __future__ import annotations

import numpy as np

#: Rings whose estimated power is below this fraction of the spectrum's median are raised to it, so that no ring
#: gets a weight out of proportion (a ring of few samples, a spectrum that the microscope's filtering drove to 0).
POWER_FLOOR = 0.05
#: Background pixels an image must have for the estimate (beyond the mask and its soft edge, inside the box).
MIN_BACKGROUND_PIXELS = 64
#: Images read and transformed at a time (float64): a bounded working set at any box.
BLOCK = 64
#: Images the estimate takes at most: an evenly spaced subset of the stack (the same one for any number of ranks).
MAX_IMAGES = 1000


def background_mask(M: int, ou: float, edge_px: float) -> np.ndarray:
    """float64 (M, M): 0 inside the particle mask (radius ou with its soft edge, :func:`gpu_ali3d.score.soft_mask`)
    rising by a raised cosine of width edge_px to 1 beyond ou + 1.5 edge_px (centre (M // 2, M // 2))."""
    from .score import soft_mask

    return 1.0 - soft_mask(M, ou + edge_px, edge_px)


def background_pixels(M: int, ou: float, edge_px: float) -> int:
    """How many pixels of an M-pixel box lie in the background (:func:`background_mask` above 0.5)."""
    return int(np.count_nonzero(background_mask(M, ou, edge_px) > 0.5))


def ring_index(M: int) -> np.ndarray:
    """int64 (M, M): the ring (round |k|, Fourier pixels of the M grid) of each sample of ``np.fft.fft2``'s layout."""
    k = np.fft.fftfreq(M) * M
    return np.rint(np.hypot(k[None, :], k[:, None])).astype(np.int64)


def subset_rows(n: int, most: int = MAX_IMAGES) -> np.ndarray:
    """The rows of an n-image stack the estimate reads: all of them, or ``most`` evenly spaced (int64, sorted)."""
    if n <= most:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, most).round().astype(np.int64))


def background_spectrum(images, ou: float, edge_px: float) -> np.ndarray:
    """The noise power per ring of ``images`` (real (n, M, M), numpy order, centre (M // 2, M // 2); an array or
    an io.stack.StreamedImages, read :data:`BLOCK` images at a time), from their background (:func:`background_mask`).

    Each image's background pixels, less their mean, are weighted by the mask, Fourier transformed, divided by
    their mask-weighted variance (a shape, not a level), and |F|^2 summed per ring over the images and divided by
    the ring's sum of what white noise gives (:func:`white_response`). Returns float64
    (M // 2 + 1,): the power of rings 0..M/2, ring 0 set to ring 1's, floored at :data:`POWER_FLOOR` of the median
    and divided by the mean of rings 1..M/2 (white noise gives about 1 everywhere).
    Raises ValueError when the background has fewer than :data:`MIN_BACKGROUND_PIXELS` pixels (ou too close to
    the box edge) or no image has any variance there.
    """
    imgs = images if hasattr(images, "shape") and hasattr(images, "ndim") else np.asarray(images)
    if imgs.ndim == 2:
        imgs = np.asarray(imgs)[None]
    if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2] or imgs.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (n, M, M) stack; got shape {tuple(imgs.shape)}")
    m = imgs.shape[1]
    bmask = background_mask(m, ou, edge_px)
    pixels = background_pixels(m, ou, edge_px)
    if pixels < MIN_BACKGROUND_PIXELS:
        raise ValueError(f"a mask of radius {ou} leaves {pixels} background pixels in a "
                         f"{m}-pixel box: too few to estimate the noise; use a smaller ou or --objective plain")
    rings = ring_index(m)
    wsum = bmask.sum()
    total = np.zeros(rings.max() + 1)
    used = 0
    for start in range(0, imgs.shape[0], BLOCK):
        block = np.asarray(imgs[start:start + BLOCK], dtype=np.float64)      # read (StreamedImages) block by block
        mean = np.einsum("nyx,yx->n", block, bmask) / wsum
        centred = (block - mean[:, None, None]) * bmask
        var = np.einsum("nyx,yx->n", centred ** 2, bmask) / wsum
        ok = np.isfinite(var) & (var > 0)
        if not ok.any():
            continue
        power = np.abs(np.fft.fft2(centred[ok])) ** 2 / var[ok, None, None]
        total += np.bincount(rings.ravel(), weights=power.sum(axis=0).ravel(), minlength=total.size)
        used += int(ok.sum())
    if used == 0:
        raise ValueError("no image has any variance in its background: cannot estimate the noise spectrum")
    response = np.bincount(rings.ravel(), weights=white_response(bmask).ravel(), minlength=total.size)
    spectrum = (total / np.maximum(response, 1e-300))[: m // 2 + 1]
    spectrum[0] = spectrum[1]
    spectrum = np.maximum(spectrum, POWER_FLOOR * np.median(spectrum[1:]))
    return spectrum / spectrum[1:].mean()


def white_response(mask: np.ndarray) -> np.ndarray:
    """float64 (M, M), fft2 layout: E |F(m (x - mu))(k)|^2 for white noise x of unit variance, with mu the
    m-weighted mean (sum m x / sum m), i.e. what :func:`background_spectrum` sums per sample for white noise:
    sum m^2 - (2 / W) Re(F(m^2) conj F(m)) + (sum m^2 / W^2) |F(m)|^2 (W = sum m). Dividing by it removes the
    mask's blur and the mean's removal from the estimate (without it the lowest rings read about 10 % low)."""
    m = np.asarray(mask, dtype=np.float64)
    w, m2 = m.sum(), (m * m).sum()
    fm, fm2 = np.fft.fft2(m), np.fft.fft2(m * m)
    return m2 - 2.0 / w * (fm2 * np.conj(fm)).real + m2 / w ** 2 * np.abs(fm) ** 2


def whitening_weights(spectrum: np.ndarray, freqs: np.ndarray, N: int, M: int) -> np.ndarray:
    """float64 (S,): 1 / sqrt(noise power) at each sample ``freqs`` ((S, 2) kx, ky in padded-grid units, cycles
    per N pixels; :class:`gpu_ali3d.score.PreparedImages`), ``spectrum`` per ring of the M grid
    (:func:`background_spectrum`), linearly interpolated between rings (the last ring's beyond)."""
    spectrum = np.asarray(spectrum, dtype=np.float64)
    if spectrum.ndim != 1 or spectrum.size < 2 or not np.all(np.isfinite(spectrum) & (spectrum > 0)):
        raise ValueError("the noise spectrum must be a 1-D array of at least 2 positive finite ring powers")
    radius = np.hypot(freqs[:, 0], freqs[:, 1]) * (M / N)                 # Fourier pixels of the M grid
    power = np.interp(radius, np.arange(spectrum.size), spectrum)
    return 1.0 / np.sqrt(power)


def spectrum_text(spectrum: np.ndarray, box: int, apix_A: float) -> str:
    """noise_spectrum.txt: one line per ring, ``ring resolution_A power`` (ring 0's resolution written as inf)."""
    lines = ["# ring  resolution_A  relative_noise_power (gpu_ali3d.noise.background_spectrum)"]
    for ring, power in enumerate(np.asarray(spectrum, dtype=np.float64)):
        res = float("inf") if ring == 0 else box * apix_A / ring
        lines.append(f"{ring:4d}  {res:10.3f}  {power:.6f}")
    return "\n".join(lines) + "\n"
