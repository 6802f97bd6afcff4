"""The plain reference projector: exact central sections of a volume's Fourier transform, computed with finufft.

This module is the readable float64 anchor that the fast gridding paths are tested against. It samples the
volume's discrete-time Fourier transform *exactly* (to the finufft tolerance) at the rotated 2-D FFT grid of each
image, so it has no interpolation error of its own. Conventions are those of :mod:`gpu_ali3d.geometry`:

* A volume is a real numpy array (z, y, x) of side M; its centre voxel is index M // 2 on each axis (as RELION,
  SPARX and EMAN2 place it), so the voxel ``V[iz, iy, ix]`` sits at ``r = (ix - M//2, iy - M//2, iz - M//2)``.
* Its transform is ``F(q) = sum_r V(r) exp(-2 pi i q.r / M)`` with q in cycles per box (x, y, z order).
* A projection at rotation R (``geometry.rotation_matrix``) has the 2-D transform ``P(k) = F(R.T @ (kx, ky, 0))``
  where P is taken about the image centre (M // 2, M // 2): the central-section theorem for the real-space image
  ``p(x, y) = sum_z V(R.T @ (x, y, z))``.
* Images are numpy (row = y, column = x). The image at pose (phi, theta, psi, sx, sy) is the projection translated
  by (-sx, -sy) pixels; translating content by d multiplies its FFT by ``exp(-2 pi i k.d / M)``.
* The CTF, when given, multiplies the image's FFT on the grid of :func:`gpu_ali3d.ctf.ctf_grid` (FFT order,
  fx along columns, fy along rows, 1/Angstrom through ``apix_A``).
"""
from __future__ import annotations

import numpy as np

from .ctf import CTFParams, check_ctf_arguments, ctf_grid
from .geometry import as_poses, rotation_matrix
from .gridding import as_cube

#: Non-uniform points per finufft call; bounds the float64/complex128 work arrays to a few hundred MB.
_POINTS_PER_CALL = 1 << 23


def project(volume: np.ndarray, poses: np.ndarray, *, ctf: CTFParams | None = None, apix_A: float = 1.0,
            oversampling_eps: float = 1e-9) -> np.ndarray:
    """Projections of a volume at the given poses, optionally multiplied by each particle's CTF.

    Parameters
    ----------
    volume : real array (M, M, M), numpy order (z, y, x), centre voxel at index M // 2 (module docstring).
        Odd and even M are both handled.
    poses : float array (n, 5) or (5,): phi, theta, psi (degrees, SPIDER ZYZ), sx, sy (pixels, SPARX sign: the
        image is the projection translated by (-sx, -sy)); see :mod:`gpu_ali3d.geometry`.
    ctf : CTFParams of n particles (or of one, applied to all), or None for no CTF. Evaluated with
        :func:`gpu_ali3d.ctf.ctf_grid`, so CTF(0) = +amplitude contrast and the image keeps the map's contrast.
    apix_A : pixel size in Angstrom; only used to evaluate the CTF.
    oversampling_eps : requested relative accuracy of finufft's evaluation of the volume's transform (the
        spreading kernel width and upsampling follow from it); 1e-9 makes the projector exact for all purposes.

    Returns
    -------
    Real array (n, M, M), numpy order (y, x), image centre at (M // 2, M // 2); float32 when the volume is
    float32 (or narrower), otherwise float64. The arithmetic is float64 throughout.

    Method: for each image, the half FFT grid ``k = (kx, ky)`` (``np.fft.rfft2`` layout, integer cycles per box)
    is rotated to ``q = R.T @ (kx, ky, 0)`` and ``F(q)`` is evaluated there with ``finufft.nufft3d2``; the centre
    phase ``exp(-2 pi i (kx + ky) (M // 2) / M)`` moves the origin from the image centre to index 0, the shift
    phase ``exp(+2 pi i (kx sx + ky sy) / M)`` translates by (-sx, -sy), the CTF multiplies, and ``irfft2``
    returns the image. For even M the Nyquist row and column are kept as ``irfft2`` reads them (a Hermitian
    image); no resolution limit is applied.
    """
    import finufft  # a hard dependency, imported here so that `import gpu_ali3d` stays light

    vol = as_cube(volume)
    m = vol.shape[0]
    poses = as_poses(poses)
    n = len(poses)
    check_ctf_arguments(ctf, n, apix_A, "poses")
    if not (0 < oversampling_eps < 1):
        raise ValueError(f"oversampling_eps must be in (0, 1) (finufft tolerance); got {oversampling_eps}")
    out_dtype = np.float32 if vol.dtype.itemsize <= 4 else np.float64
    out = np.empty((n, m, m), dtype=out_dtype)
    if n == 0:
        return out

    # The image's half FFT grid in cycles per box (FFT order): ky along rows, kx along columns.
    ky = np.fft.fftfreq(m, d=1.0 / m)[:, None] * np.ones((1, m // 2 + 1))
    kx = np.fft.rfftfreq(m, d=1.0 / m)[None, :] * np.ones((m, 1))
    centre = m // 2
    centre_phase = np.exp(-2j * np.pi * (kx + ky) * centre / m)               # (M, M//2+1)
    if ctf is not None:
        ctf_all = ctf_grid(ctf, m, apix_A, half=True)                          # (n or 1, M, M//2+1)
    # finufft's modes run from -M//2 upwards along each array axis, the first axis pairing with the first
    # coordinate: with the (z, y, x) array, the coordinates are 2 pi (qz, qy, qx) / M and isign = -1.
    f = np.ascontiguousarray(vol, dtype=np.complex128)

    chunk = max(1, _POINTS_PER_CALL // kx.size)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rot = rotation_matrix(poses[start:stop, 0], poses[start:stop, 1], poses[start:stop, 2])   # (c, 3, 3)
        # q = R.T @ (kx, ky, 0): q_j = R[0, j] kx + R[1, j] ky
        q = rot[:, None, None, 0, :] * kx[None, :, :, None] + rot[:, None, None, 1, :] * ky[None, :, :, None]
        q = q.reshape(-1, 3) * (2.0 * np.pi / m)
        values = finufft.nufft3d2(np.ascontiguousarray(q[:, 2]), np.ascontiguousarray(q[:, 1]),
                                  np.ascontiguousarray(q[:, 0]), f, eps=oversampling_eps, isign=-1)
        spectrum = values.reshape(stop - start, m, m // 2 + 1) * centre_phase
        sx = poses[start:stop, 3, None, None]
        sy = poses[start:stop, 4, None, None]
        spectrum *= np.exp(2j * np.pi * (kx * sx + ky * sy) / m)
        if ctf is not None:
            spectrum *= ctf_all if len(ctf_all) == 1 else ctf_all[start:stop]
        out[start:stop] = np.fft.irfft2(spectrum, s=(m, m))
    return out


def shift_images(images: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Translate real images by (dx, dy) pixels in Fourier space: the content moves by +d.

    images : real array (n, M, M) or (M, M), numpy order (y, x); M odd or even.
    shifts_px : float array (n, 2) or (2,): (dx, dy) per image, dx along columns (x), dy along rows (y).
        Non-integer shifts interpolate with the band-limited (sinc) kernel; the shift is circular.
    Returns float64 (n, M, M) (or (M, M) for a single image): ``irfft2(rfft2(img) * exp(-2 pi i k.d / M))``.
    To centre an image whose pose has shift (sx, sy) (geometry module), shift it by (+sx, +sy).
    """
    imgs = np.asarray(images, dtype=np.float64)
    single = imgs.ndim == 2
    if single:
        imgs = imgs[None]
    if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2]:
        raise ValueError(f"images must be square, shape (n, M, M) or (M, M); got {np.shape(images)}")
    n, m = imgs.shape[0], imgs.shape[1]
    d = np.asarray(shifts_px, dtype=np.float64)
    if d.shape == (2,):
        d = np.broadcast_to(d, (n, 2))
    if d.shape != (n, 2):
        raise ValueError(f"shifts_px must have shape ({n}, 2) or (2,) as (dx, dy) pixels; got {np.shape(shifts_px)}")
    ky = np.fft.fftfreq(m, d=1.0 / m)[None, :, None]
    kx = np.fft.rfftfreq(m, d=1.0 / m)[None, None, :]
    phase = np.exp(-2j * np.pi * (kx * d[:, 0, None, None] + ky * d[:, 1, None, None]) / m)
    out = np.fft.irfft2(np.fft.rfft2(imgs) * phase, s=(m, m))
    return out[0] if single else out
