"""The reference projector against a direct DFT sum and exact real-space projections (axis order, centre phase,
shift sign, odd and even boxes), and shift_images against np.roll."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_ali3d.ctf import CTFParams, ctf_grid
from gpu_ali3d.geometry import rotation_matrix
from gpu_ali3d.projection import project, shift_images

# finufft at eps=1e-9 on a few hundred voxels: errors ~1e-9 relative to the largest value; 1e-7 leaves margin.
TOL = 1e-7


def _dft_half_spectrum(volume, pose):
    """F(R.T k) on the image's half FFT grid by a direct sum over voxels, with the centre and shift phases."""
    m = volume.shape[0]
    c = m // 2
    iz, iy, ix = np.meshgrid(*(np.arange(m) - c,) * 3, indexing="ij")
    r = np.stack([ix.ravel(), iy.ravel(), iz.ravel()])                       # (3, M^3), (x, y, z)
    ky, kx = np.meshgrid(np.fft.fftfreq(m, 1 / m), np.fft.rfftfreq(m, 1 / m), indexing="ij")
    k = np.stack([kx.ravel(), ky.ravel(), np.zeros(kx.size)])                 # (3, M(M//2+1))
    q = rotation_matrix(*pose[:3]).T @ k
    f = np.exp(-2j * np.pi * (q.T @ r) / m) @ volume.ravel()                 # the volume's DTFT at q
    spectrum = f.reshape(kx.shape) * np.exp(-2j * np.pi * (kx + ky) * c / m)
    return spectrum * np.exp(2j * np.pi * (kx * pose[3] + ky * pose[4]) / m)


@pytest.mark.parametrize("m", [5, 6, 7, 8])
def test_project_matches_direct_dft(m, rng):
    vol = rng.normal(size=(m, m, m))
    poses = np.column_stack([rng.uniform(0, 360, 4), rng.uniform(0, 180, 4), rng.uniform(0, 360, 4),
                             rng.uniform(-2, 2, (4, 2))])
    got = project(vol, poses)
    assert got.dtype == np.float64 and got.shape == (4, m, m)
    want = np.stack([np.fft.irfft2(_dft_half_spectrum(vol, p), s=(m, m)) for p in poses])
    assert np.abs(got - want).max() < TOL * np.abs(want).max()
    if m % 2:
        # Odd boxes have no Nyquist ambiguity: the real part of the full-grid inverse FFT is the same image.
        full = np.stack([np.fft.ifft2(_full_from_half(_dft_half_spectrum(vol, p), m)).real for p in poses])
        assert np.abs(got - full).max() < TOL * np.abs(want).max()


def _full_from_half(half, m):
    full = np.empty((m, m), complex)
    full[:, : m // 2 + 1] = half
    ky = (-np.arange(m)) % m
    for kx in range(m // 2 + 1, m):
        full[:, kx] = np.conj(half[ky, m - kx])
    return full


@pytest.mark.parametrize("m", [8, 9])
def test_project_real_space_views(m, rng):
    """Axis-aligned poses against sums of the array: the axis order, the centre voxel and the shift sign."""
    vol = rng.normal(size=(m, m, m))
    c = m // 2
    i = np.arange(m)
    top = vol.sum(axis=0)                                                     # along z: image[y, x]
    # Identity pose with an integer shift: the projection along z translated by (-sx, -sy).
    got = project(vol, [0, 0, 0, 2, -1])[0]
    np.testing.assert_allclose(got, np.roll(top, (1, -2), axis=(0, 1)), atol=TOL * np.abs(top).max())
    # psi = 90: R.T (x, y, z) = (-y, x, z), so image(x, y) = top(X=-y, Y=x).
    got = project(vol, [0, 0, 90, 0, 0])[0]
    want = top[i[None, :], (2 * c - i[:, None]) % m]
    np.testing.assert_allclose(got, want, atol=TOL * np.abs(top).max())
    # theta = 90: R.T (x, y, z) = (z, y, -x): projects along the map's x axis, image(x, y) = sum_X V(X, y, -x).
    got = project(vol, [0, 90, 0, 0, 0])[0]
    side = vol.sum(axis=2)                                                    # [Z, Y]
    want = side[(2 * c - i[None, :]) % m, i[:, None]]
    np.testing.assert_allclose(got, want, atol=TOL * np.abs(side).max())


def test_project_ctf_multiplies_the_spectrum(rng):
    m = 9                                                                     # odd: no Nyquist column to mix
    vol = rng.normal(size=(m, m, m)).astype(np.float32)
    poses = np.column_stack([rng.uniform(0, 360, (3, 3)), rng.uniform(-1, 1, (3, 2))])
    ctf = CTFParams([15000, 20000, 25000], [14800, 19000, 25000], [10, 50, 0], 300, 2.7, 0.1, 0)
    got = project(vol, poses, ctf=ctf, apix_A=3.0)
    assert got.dtype == np.float32
    plain = project(vol.astype(np.float64), poses)
    want = np.fft.irfft2(np.fft.rfft2(plain) * ctf_grid(ctf, m, 3.0), s=(m, m))
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())    # float32 output rounding


def test_project_validates_arguments():
    vol = np.zeros((4, 4, 4))
    with pytest.raises(ValueError, match="cube"):
        project(np.zeros((4, 4, 5)), np.zeros((1, 5)))
    with pytest.raises(ValueError, match=r"\(n, 5\)"):
        project(vol, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="ctf has 2 entries"):
        project(vol, np.zeros((3, 5)), ctf=CTFParams([1e4, 1e4], [1e4, 1e4], 0, 300, 2.7, 0.1, 0))
    assert project(vol, np.zeros(5)).shape == (1, 4, 4)


@pytest.mark.parametrize("m", [10, 11])
def test_shift_images(m, rng):
    img = rng.normal(size=(2, m, m))
    # Integer shifts are exact circular translations; content moves by +d (dx along columns, dy along rows).
    np.testing.assert_allclose(shift_images(img, [[3, -2], [-1, 4]]),
                               np.stack([np.roll(img[0], (-2, 3), axis=(0, 1)), np.roll(img[1], (4, -1), axis=(0, 1))]),
                               atol=1e-12)
    # Fractional shifts compose and invert (for a band-limited image: zero the even-box Nyquist lines first).
    smooth = np.fft.irfft2(np.fft.rfft2(img) * _below_nyquist(m), s=(m, m))
    there = shift_images(smooth, [0.3, -1.7])
    np.testing.assert_allclose(shift_images(there, [-0.3, 1.7]), smooth, atol=1e-12)
    np.testing.assert_allclose(shift_images(shift_images(smooth[0], [0.5, 0.25]), [0.5, 0.75]),
                               np.roll(smooth[0], (1, 1), axis=(0, 1)), atol=1e-12)


def test_shift_images_matches_projection_shift(rng):
    """shift_images and project's shift use one convention: image at (sx, sy) = projection shifted by -s."""
    vol = rng.normal(size=(9, 9, 9))
    pose = np.array([30.0, 60.0, 100.0, 0.0, 0.0])
    shifted = pose + [0, 0, 0, 1.3, -0.6]
    np.testing.assert_allclose(project(vol, shifted)[0], shift_images(project(vol, pose)[0], [-1.3, 0.6]),
                               atol=TOL * 100)


def _below_nyquist(m):
    keep = np.ones((m, m // 2 + 1))
    if m % 2 == 0:
        keep[m // 2, :] = 0
        keep[:, m // 2] = 0
    return keep
