"""resolution.py against independent computations: direct DFT sums, scipy.ndimage morphology, integer geometry."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from gpu_ali3d import resolution as R


def _grid(M, ndim=3):
    """Integer offsets from the centre voxel M // 2, numpy axis order (z, y, x)."""
    a = np.arange(M) - M // 2
    return np.meshgrid(*([a] * ndim), indexing="ij")


def _blob(M, centre_xyz=None, sigma=2.0):
    """A Gaussian blob, (z, y, x), centred at centre_xyz (x, y, z, absolute voxel indices; default M // 2)."""
    c = (M // 2,) * 3 if centre_xyz is None else centre_xyz
    z, y, x = np.meshgrid(*([np.arange(M)] * 3), indexing="ij")
    return np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * sigma ** 2))


# ------------------------------------------------------------------------------------------------------ fsc
def _fsc_slow(a, b, w=1.0):
    """calc_fourier_shell_correlation written out plainly: direct DFT sums, one Fourier coefficient at a time."""
    shape3 = a.shape if a.ndim == 3 else (1,) + a.shape
    a3, b3 = a.reshape(shape3), b.reshape(shape3)
    nz, ny, nx = shape3
    nx2, ny2, nz2 = nx // 2, ny // 2, nz // 2
    inc = int(nx2 / w + 0.5)
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    ret, n1, n2, lr = (np.zeros(inc + 1) for _ in range(4))
    for iz in range(nz):
        kz = iz - nz if iz > nz2 else iz
        for iy in range(ny):
            ky = iy - ny if iy > ny2 else iy
            for kx in range(nx // 2 + 1):
                if not (kx > 0 or (kz >= 0 and (ky >= 0 or kz != 0))):
                    continue
                rho = 0.5 * math.sqrt(kz * kz / max(nz2, 1) ** 2 + ky * ky / ny2 ** 2 + kx * kx / nx2 ** 2)
                r = int(2 * inc * rho + 0.5)
                if r > inc:
                    continue
                e = np.exp(-2j * np.pi * (kx * x / nx + ky * y / ny + kz * z / nz))
                fa, fb = (a3 * e).sum(), (b3 * e).sum()
                ret[r] += (fa * np.conj(fb)).real
                n1[r] += abs(fa) ** 2
                n2[r] += abs(fb) ** 2
                lr[r] += 2
    rows = [(i / (2 * inc), ret[i] / math.sqrt(n1[i] * n2[i]), lr[i]) for i in range(inc + 1) if lr[i] > 0]
    return np.array(rows).T


@pytest.mark.parametrize("shape, w", [((6, 6, 6), 1.0), ((5, 7, 6), 1.0), ((6, 6, 6), 0.5), ((7, 7, 7), 1.5),
                                      ((8, 8), 1.0), ((9, 8), 0.7)])
def test_fsc_equals_direct_dft_loop(shape, w, rng):
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    got = R.fsc(a, b, w=w)
    want = _fsc_slow(a, b, w)
    assert np.array_equal(got.freq, want[0])
    assert np.array_equal(got.n_voxels, want[2])
    np.testing.assert_allclose(got.fsc, want[1], rtol=0, atol=1e-12)   # FFT vs direct sums: float64 rounding


@pytest.mark.parametrize("shape", [(16, 16, 16), (15, 15, 15), (12, 10, 14), (32, 32)])
def test_fsc_of_a_map_with_itself_is_one(shape, rng):
    a = rng.standard_normal(shape)
    c = R.fsc(a, a)
    np.testing.assert_allclose(c.fsc, 1.0, atol=1e-12)
    nx = shape[-1]
    assert len(c.freq) == nx // 2 + 1
    np.testing.assert_allclose(c.freq, np.arange(nx // 2 + 1) / (2 * (nx // 2)))     # i / M for even M
    assert c.freq[-1] == 0.5 and c.n_voxels[0] == 2                                 # DC counted as a pair


def test_fsc_of_independent_noise_is_near_zero(rng):
    a, b = rng.standard_normal((32, 32, 32)), rng.standard_normal((32, 32, 32))
    c = R.fsc(a, b)
    big = c.n_voxels >= 50
    assert big.sum() >= 14
    assert np.all(np.abs(c.fsc[big]) < 5 / np.sqrt(c.n_voxels[big]))    # std of an FSC of noise ~ 1/sqrt(n)
    # and a correlated pair is not near zero (the check above can fail)
    c2 = R.fsc(a, a + b)
    assert np.all(c2.fsc[big] > 0.5)


@pytest.mark.parametrize("M", [15, 16])
def test_fsc_voxel_counts(M, rng):
    z, y, x = _grid(M)           # full Fourier grid indices, about 0 (= FFT order up to a roll)
    k = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    c = R.fsc(rng.standard_normal((M, M, M)), rng.standard_normal((M, M, M)))
    assert np.all(c.n_voxels > 0)
    shells = np.rint(c.freq * 2 * (M // 2)).astype(int)
    if M % 2:
        # odd box, no Nyquist: all voxels within radius 0.5 (|k| < (M-1)/2 + 1/2), the DC counted twice
        assert c.n_voxels.sum() == np.count_nonzero(k < (M - 1) / 2 + 0.5) + 1
    for r, n in zip(shells, c.n_voxels):
        if r < M // 2 - 1:    # away from the Nyquist planes a shell holds every voxel that rounds to it
            assert n == np.count_nonzero(np.floor(k + 0.5) == r) + (r == 0)


def test_fsc_leaves_out_shells_without_power_and_pads_at_the_end(rng):
    flat = np.full((16, 16, 16), 2.0)                          # all power in the DC shell, exactly zero elsewhere
    c = R.fsc(flat, rng.standard_normal((16, 16, 16)))
    assert len(c.freq) == 9                                    # every shell has coefficients...
    assert c.freq[0] == 0 and abs(c.fsc[0]) == pytest.approx(1) and c.n_voxels[0] == 2
    assert np.all(c.freq[1:] == 0) and np.all(c.fsc[1:] == 0) and np.all(c.n_voxels[1:] == 0)  # ...8 are padding
    r = R.fsc_resolution(np.r_[0, 1 / 16, 0, 0], np.r_[1, 0.9, 0, 0])
    assert r.freq_px == 1 / 16                                 # padding rows are not read as part of the curve


def test_fsc_rejects_bad_input(rng):
    with pytest.raises(ValueError, match="different shapes"):
        R.fsc(np.zeros((8, 8, 8)), np.zeros((8, 8, 6)))
    with pytest.raises(ValueError, match="w="):
        R.fsc(np.ones((8, 8)), np.ones((8, 8)), w=0)
    with pytest.raises(TypeError, match="real array"):
        R.fsc(np.ones((8, 8), complex), np.ones((8, 8)))


# ------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("M", [16, 17])
def test_sphere_and_circle_masks_are_model_circle(M):
    z, y, x = _grid(M)
    for r in (1, 3, 5, M // 2 - 2, M // 2):
        np.testing.assert_array_equal(R.sphere_mask(M, r), (x * x + y * y + z * z <= r * r).astype(float))
        np.testing.assert_array_equal(R.circle_mask(M, r), (x[0] ** 2 + y[0] ** 2 <= r * r).astype(float))
    assert R.sphere_mask(M, 3).dtype == np.float64 and R.sphere_mask(M, 3)[M // 2, M // 2, M // 2 + 3] == 1


def test_soft_edge_mask():
    M, r, soft = 32, 8, 4
    m = R.sphere_mask(M, r, soft_edge=soft)
    sharp = R.sphere_mask(M, r)
    z, y, x = _grid(M)
    d = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    assert np.all(m[sharp == 1] == 1)
    assert np.all(m[d >= r + soft] == 0)
    ring = (sharp == 0) & (d < r + soft)
    np.testing.assert_allclose(m[ring], 0.5 * (1 + np.cos(np.pi * (d[ring] - r) / soft)))
    assert 0 < m[ring].min() and m[ring].max() < 1
    with pytest.raises(ValueError, match="radius"):
        R.sphere_mask(M, 0)
    with pytest.raises(ValueError, match="soft_edge"):
        R.circle_mask(M, 3, soft_edge=-1)


@pytest.mark.parametrize("M, r", [(32, 10), (32, 16), (17, 8)])
def test_border_shell_matches_scipy_morphology(M, r):
    mask = R.sphere_mask(M, r)
    ball = R.sphere_mask(5, 2).astype(bool)                  # SPARX's default element model_circle(2, 5, 5, 5)
    m = mask >= 0.5
    dil = ndimage.binary_dilation(m, structure=ball, border_value=0)
    ero = ndimage.binary_erosion(m, structure=ball, border_value=1)   # SPARX never erodes from beyond the box
    np.testing.assert_array_equal(R.border_shell(mask), dil & ~ero)


def test_border_shell_is_two_voxels_either_side_of_the_edge():
    M, r = 40, 12
    shell = R.border_shell(R.sphere_mask(M, r))
    z, y, x = _grid(M)
    d = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    assert d[shell].min() > r - 2.5 and d[shell].max() <= r + 2
    assert shell[(d >= r - 1.5) & (d < r + 1)].all()          # the core of the band; its rims are ragged
    thickness = shell.sum() / (4 * np.pi * r ** 2)            # voxels / sphere area: ~3.4 (SPARX's radius-2 ball
    assert 3.0 < thickness < 4.0                              # reaches less than 2 voxels along diagonals)


def test_fsc_mask_subtracts_the_border_mean_and_masks(rng):
    M = 24
    mask = R.sphere_mask(M, 9)
    a = _blob(M, sigma=3) + 0.3 * rng.standard_normal((M,) * 3)
    b = _blob(M, sigma=3) + 0.3 * rng.standard_normal((M,) * 3)
    base = R.fsc_mask(a, b, mask)
    shifted = R.fsc_mask(a + 7.0, b - 3.0, mask)                 # constants are removed by the border mean
    np.testing.assert_allclose(shifted.fsc, base.fsc, atol=1e-12)
    plain = R.fsc((a + 7.0) * mask, b * mask)                     # without that, the constant matters
    assert np.abs(plain.fsc - base.fsc).max() > 0.05
    shell = R.border_shell(mask)
    want = R.fsc((a - a[shell].mean()) * mask, (b - b[shell].mean()) * mask)
    np.testing.assert_allclose(base.fsc, want.fsc, atol=1e-14)
    default = R.fsc_mask(a, b)                                    # no mask: model_circle(M // 2)
    np.testing.assert_allclose(default.fsc, R.fsc_mask(a, b, R.sphere_mask(M, M // 2)).fsc, atol=1e-14)


# ------------------------------------------------------------------------------------------- tanh filter
def _half_fsc_for(full):
    """The half-map FSC whose 2r/(1+r) is `full`."""
    return full / (2.0 - full)


@pytest.mark.parametrize("cutoff, falloff", [(0.2, 0.2), (0.3, 0.1), (0.12, 0.3)])
def test_fit_tanh_recovers_a_tanh_shaped_fsc(cutoff, falloff):
    freq = np.arange(33) / 64
    half = _half_fsc_for(R.tanl_response(freq, cutoff, falloff))
    curve = (freq, half.copy(), np.ones(33))
    c, a = R.fit_tanh(curve)
    assert abs(c - cutoff) < 0.005 and abs(a - falloff) < 0.02
    np.testing.assert_array_equal(curve[1], half)                 # the caller's curve is left alone


def test_fit_tanh_never_below_half_and_start_rules():
    freq = np.arange(17) / 32
    assert R.fit_tanh((freq, np.full(17, 0.9), None)) == (0.4, 0.2)
    # only the last point below 0.5: SPARX does not search the last point, so no fit either
    last = np.full(17, 0.9)
    last[-1] = 0.1
    assert R.fit_tanh((freq, last, None)) == (0.4, 0.2)
    # a real drop is fitted: the result moves away from the start (freq before the drop, fall-off 0.1)
    drop = _half_fsc_for(R.tanl_response(freq, 0.25, 0.25))
    c, a = R.fit_tanh((freq, drop, None))
    assert (c, a) != (0.4, 0.2) and abs(c - 0.25) < 0.01


def test_fit_tanh_zeroes_the_tail_below_low():
    # full FSC: 1 at low frequency, a dip below 0.1 at shell 6, then noise back up near 0.6: after zeroing from
    # the dip on, the fit sees a clean cut at about shell 5.5, not the rebound
    freq = np.arange(17) / 32
    full = np.where(np.arange(17) < 6, 0.98, 0.6)
    full[6] = 0.05
    c, _ = R.fit_tanh((freq, _half_fsc_for(full), None))
    assert 4.5 / 32 < c < 6.5 / 32


def test_fit_tanh_keeps_sparx_zero_falloff_vertex():
    # SPARX scores a vertex with fall-off exactly 0 as 0, the best possible misfit, so a simplex that steps onto
    # it (0.1 - 2 * 0.05) stays there. This 16-point curve does so; filt_tanl then cuts sharply.
    freq = np.arange(9) / 16
    c, a = R.fit_tanh((freq, _half_fsc_for(R.tanl_response(freq, 0.22, 0.15)), None))
    assert a == 0.0 and c == pytest.approx(0.3125)
    sharp = R.tanl_response(np.array([0.0, 0.3, c, 0.32]), c, a)
    np.testing.assert_array_equal(sharp, [1.0, 1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="cut-off"):
        R.tanl_response(0.1, 0.0, 0.1)


def test_amoeba_maximises_like_sparx():
    x, f, steps = R._amoeba([0.0, 0.0], [0.5, 0.5], lambda p: 1.0 - (p[0] - 0.3) ** 2 - 2 * (p[1] + 0.2) ** 2)
    assert abs(x[0] - 0.3) < 0.01 and abs(x[1] + 0.2) < 0.01 and f > 0.9999 and 0 < steps < 500


@pytest.mark.parametrize("shape", [(32, 32, 32), (15, 15, 15), (32, 32)])
def test_filt_tanl_response_is_the_formula(shape):
    cutoff, falloff = 0.25, 0.2
    delta = np.zeros(shape)
    delta[(0,) * len(shape)] = 1.0                            # flat spectrum
    out = R.filt_tanl(delta, cutoff, falloff)
    measured = np.fft.rfftn(out)
    s = np.sqrt(sum(g ** 2 for g in R._freq_grid(shape)))      # jx/nx etc., cycles per pixel
    formula = 0.5 * (np.tanh(np.pi * (s + cutoff) / (2 * falloff * cutoff))
                     - np.tanh(np.pi * (s - cutoff) / (2 * falloff * cutoff)))
    np.testing.assert_allclose(measured.real, formula, atol=1e-12)
    np.testing.assert_allclose(measured.imag, 0, atol=1e-12)
    if shape[-1] == 32:      # on-axis voxel 8 of 32 sits at the cut-off
        idx = (0,) * (len(shape) - 1) + (8,)
        assert measured.real[idx] == pytest.approx(0.5 * np.tanh(np.pi / falloff), abs=1e-12)
        assert measured.real[(0,) * len(shape)] == pytest.approx(np.tanh(np.pi / (2 * falloff)), abs=1e-12)


def test_filt_tanl_radial_response_of_white_noise(rng):
    M = 48
    noise = rng.standard_normal((M, M, M))
    ratio = np.abs(np.fft.rfftn(R.filt_tanl(noise, 0.2, 0.1))) / np.abs(np.fft.rfftn(noise))
    s = np.sqrt(sum(g ** 2 for g in R._freq_grid(noise.shape)))
    for f, want in [(0.05, 1.0), (0.2, 0.5), (0.35, 0.0)]:
        sel = np.abs(s - f) < 0.01
        assert ratio[sel].mean() == pytest.approx(want, abs=0.03)


def test_filt_tanl_pad_fills_with_the_border_mean():
    flat = np.full((12, 12, 12), 3.0)
    np.testing.assert_allclose(R.filt_tanl(flat, 0.1, 0.1, pad=True), 3.0 * math.tanh(math.pi / 0.2), atol=1e-10)
    blob = _blob(24, sigma=2.0)
    unpadded, padded = R.filt_tanl(blob, 0.2, 0.2), R.filt_tanl(blob, 0.2, 0.2, pad=True)
    np.testing.assert_allclose(padded, unpadded, atol=2e-3)   # a compact map: padding changes little...
    assert np.abs(padded - unpadded).max() > 1e-8            # ...but does change it
    with pytest.raises(ValueError, match="cutoff"):
        R.filt_tanl(blob, 0.0, 0.1)
    with pytest.raises(ValueError, match="falloff"):
        R.filt_tanl(blob, 0.2, float("nan"))


# ------------------------------------------------------------------------------------------------ centring
def test_phase_centre_of_gravity_sign_and_order():
    M = 32
    blob = _blob(M, centre_xyz=(20, 16, 10))                 # x index 20, z index 10
    c = R.phase_centre_of_gravity(blob)
    np.testing.assert_allclose(c, [4.0, 0.0, -6.0], atol=1e-6)   # (x, y, z), relative to M // 2
    img = blob[10]                                            # (y, x) slice through the blob
    np.testing.assert_allclose(R.phase_centre_of_gravity(img), [4.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("M", [24, 25])
def test_shifted_blob_gives_the_shift(M):
    d = np.array([2.5, -3.25, 1.75])                          # x, y, z
    moved = R.shift_volume(_blob(M), d)
    np.testing.assert_allclose(R.phase_centre_of_gravity(moved), d, atol=1e-9)
    recentred = R.shift_volume(moved, -R.phase_centre_of_gravity(moved))
    np.testing.assert_allclose(R.phase_centre_of_gravity(recentred), 0, atol=1e-9)


def test_shift_volume_integer_is_roll_and_round_trip(rng):
    v = rng.standard_normal((10, 12, 14))
    np.testing.assert_allclose(R.shift_volume(v, (1, -2, 3)), np.roll(v, (3, -2, 1), axis=(0, 1, 2)), atol=1e-12)
    img = rng.standard_normal((9, 8))
    np.testing.assert_allclose(R.shift_volume(img, (2, 1)), np.roll(img, (1, 2), axis=(0, 1)), atol=1e-12)
    noise = rng.standard_normal((16, 15, 14))
    s = np.sqrt(sum(g ** 2 for g in R._freq_grid(noise.shape)))
    smooth = np.fft.irfftn(np.fft.rfftn(noise) * (s < 0.45), s=noise.shape, axes=(0, 1, 2))  # nothing at Nyquist
    back = R.shift_volume(R.shift_volume(smooth, (0.3, -1.7, 2.2)), (-0.3, 1.7, -2.2))
    np.testing.assert_allclose(back, smooth, atol=1e-12)
    with pytest.raises(ValueError, match="shift"):
        R.shift_volume(smooth, (1.0, 2.0))


# ----------------------------------------------------------------------------------------------- resolution
def test_fsc_resolution():
    freq = np.arange(17) / 32
    curve = 1.0 - 2.0 * freq                                  # crosses 0.143 at 0.4285, 0.5 at 0.25
    r = R.fsc_resolution(freq, curve, 0.143, apix_A=2.0)
    assert r.freq_px == pytest.approx(0.4285) and r.resolution_A == pytest.approx(2.0 / 0.4285)
    assert R.fsc_resolution(freq, curve, 0.5).freq_px == pytest.approx(0.25)
    assert R.fsc_resolution(freq, curve, 0.143, interpolate=False).freq_px == 14 / 32
    assert R.fsc_resolution(freq, np.ones(17), 0.143).freq_px == 0.5
    text = R.fsc_text((freq[:2], curve[:2], np.array([2.0, 18.0])))
    assert text == "      0.000000      1.000000      2.000000\n      0.031250      0.937500     18.000000\n"


@pytest.mark.parametrize("cutoff, falloff", [(0.18, 0.163), (0.3, 0.05), (0.12, 0.4), (-0.2, -0.1)])
def test_tanl_band_limit_is_where_the_response_falls_to_the_level(cutoff, falloff):
    from gpu_ali3d.resolution import tanl_band_limit, tanl_response

    for level in (0.01, 0.1):
        f = tanl_band_limit(cutoff, falloff, level)
        h = lambda s: abs(float(tanl_response([s], cutoff, falloff)[0]))
        assert abs(cutoff) < f < 0.5 + abs(cutoff)
        assert h(f) == pytest.approx(level, rel=1e-3)          # the first tanh term is 1 to that precision
        assert h(f + 0.01) < level < h(f - 0.01)
    assert tanl_band_limit(0.25, 0.0) == 0.25                   # a sharp cut
    with pytest.raises(ValueError, match="cut-off"):
        tanl_band_limit(0.0, 0.1)
