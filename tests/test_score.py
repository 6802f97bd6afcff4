"""The Fourier-space objective (gpu_ali3d.score): equal to its real-space equivalent computed with the independent
finufft projector, and peaked at the true poses of RELION-made images (including the sign of the shifts)."""
from __future__ import annotations

import mrcfile
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from gpu_ali3d import gridding, score
from gpu_ali3d.ctf import from_relion
from gpu_ali3d.geometry import relion_to_spider
from gpu_ali3d.projection import project


def smooth_map(m: int, rng: np.random.Generator) -> np.ndarray:
    c = np.arange(m) - m // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    return gaussian_filter(rng.normal(size=(m, m, m)), 1.5) * np.clip((m / 2 - 2 - r) / 4.0, 0.0, 1.0)


def real_space_scores(vol, images, poses, image_index, ctf, apix_A, ou, kmax, image_pad=2):
    """The documented real-space equivalent of score(), per (pose, image) pair: the Pearson correlation over the
    L x L plane (L = image_pad * M; 2: SPARX's padded plane) of (a) the soft-masked, normalised image zero-padded
    to L and (b) the exact L-grid projection (the finufft projector on the map zero-padded to L), both
    band-limited to |k| <= kmax (padded-grid units, N = 2 M)."""
    m = vol.shape[0]
    n, s = image_pad * m, (image_pad * m) // 2 - m // 2
    padded_vol = np.zeros((n, n, n))
    padded_vol[s:s + m, s:s + m, s:s + m] = vol
    projections = project(padded_vol, poses, ctf=ctf[image_index], apix_A=apix_A)
    mask = score.soft_mask(m, ou)
    kx, ky = gridding.section_grid(n)
    disc = (kx ** 2 + ky ** 2) * (2 / image_pad) ** 2 <= kmax ** 2
    out = []
    for proj, image in zip(projections, images[image_index]):
        mu = (image * mask).sum() / mask.sum()
        sd = np.sqrt((((image - mu) ** 2) * mask).sum() / mask.sum())
        x = np.zeros((n, n))
        x[s:s + m, s:s + m] = mask * (image - mu) / sd
        xb = np.fft.irfft2(np.fft.rfft2(x) * disc, s=(n, n))
        pb = np.fft.irfft2(np.fft.rfft2(proj) * disc, s=(n, n))
        xb, pb = xb - xb.mean(), pb - pb.mean()
        out.append((xb * pb).sum() / np.sqrt((xb ** 2).sum() * (pb ** 2).sum()))
    return np.array(out)


@pytest.mark.parametrize("m", [32, 33])
def test_score_equals_real_space_correlation(m, rng):
    vol = smooth_map(m, rng)
    n_img, apix = 2, 3.0
    true = np.column_stack([rng.uniform(0, 360, n_img), rng.uniform(20, 160, n_img), rng.uniform(0, 360, n_img),
                            rng.uniform(-2, 2, n_img), rng.uniform(-2, 2, n_img)])
    ctf = from_relion(rng.uniform(8000, 15000, n_img), rng.uniform(8000, 15000, n_img), rng.uniform(0, 180, n_img),
                      300.0, 2.7, 0.1)
    images = project(vol, true, ctf=ctf, apix_A=apix) + 0.5 * rng.normal(size=(n_img, m, m))
    ou, kmax = m // 2 - 3, 0.7 * m                               # kmax in padded units (N/2 = m is Nyquist)
    prep = score.prepare_images(images.astype(np.float32), ou, ctf=ctf, apix_A=apix, kmax=kmax)
    # Several poses per image: the truth, a nearby pose and a far one.
    poses = np.concatenate([true, true + [3, -2, 4, 0.7, -1.1], true + [40, 30, -50, 3, 2]])
    image_index = np.tile(np.arange(n_img), 3)
    want = real_space_scores(vol, images.astype(np.float32).astype(np.float64), poses, image_index, ctf, apix, ou,
                             kmax)
    # A wide window makes the gridding exact, so the comparison tests the Fourier bookkeeping itself.
    exact_ref = gridding.prepare_reference(vol, kb_width=12, kb_alpha=2.9)
    got = score.score(exact_ref, prep, poses, image_index=image_index)
    err = np.abs(got - want).max()
    assert err < 1e-7, f"M={m}: |Fourier score - real-space correlation| = {err:.3g} (scores {np.round(want, 4)})"
    # SPARX's window (K = 6, alpha = 1.75): the gridding error shows, at the 1e-4 level.
    err6 = np.abs(score.score(gridding.prepare_reference(vol), prep, poses, image_index=image_index) - want).max()
    assert err6 < 2e-4, f"M={m}: K=6 score error {err6:.3g}"
    assert np.all(want[:n_img] > want[n_img:2 * n_img]) and np.all(want[n_img:2 * n_img] > want[2 * n_img:])
    print(f"M={m}: score vs real space: K=12 {err:.3g}, K=6 {err6:.3g}")
    # image_pad = 1 (refinement's choice): the same correlation over the M x M plane, on the image's own grid;
    # the map is confined to a sphere inside the box, so its projections do not wrap around.
    prep1 = score.prepare_images(images.astype(np.float32), ou, ctf=ctf, apix_A=apix, kmax=kmax, image_pad=1)
    assert len(prep1.freqs) < 0.3 * len(prep.freqs) and np.all(prep1.freqs % 2 == 0)
    want1 = real_space_scores(vol, images.astype(np.float32).astype(np.float64), poses, image_index, ctf, apix, ou,
                              kmax, image_pad=1)
    err1 = np.abs(score.score(exact_ref, prep1, poses, image_index=image_index) - want1).max()
    assert err1 < 1e-7, f"M={m}: image_pad=1 |Fourier score - real-space correlation| = {err1:.3g}"
    assert np.abs(want1 - want).max() < 0.02, f"M x M and padded-plane correlations differ: {want1} vs {want}"
    print(f"M={m}: image_pad=1 vs real space {err1:.3g}; vs the padded plane {np.abs(want1 - want).max():.3g}")


def _relion_set(star, stack, count):
    import starfile

    tables = starfile.read(star)
    optics, parts = tables["optics"], tables["particles"].iloc[:count]
    apix = float(optics["rlnImagePixelSize"].iloc[0])
    poses = relion_to_spider(parts.rlnAngleRot, parts.rlnAngleTilt, parts.rlnAnglePsi, parts.rlnOriginXAngst,
                             parts.rlnOriginYAngst, apix)
    ctf = from_relion(parts.rlnDefocusU, parts.rlnDefocusV, parts.rlnDefocusAngle,
                      float(optics["rlnVoltage"].iloc[0]), float(optics["rlnSphericalAberration"].iloc[0]),
                      float(optics["rlnAmplitudeContrast"].iloc[0]))
    images = mrcfile.read(stack)[:count]
    return images, poses, ctf, apix


@pytest.fixture(scope="module")
def relion_reference(shared_data):
    """The RELION simulation's 64^3 map, prepared once for the tests of this module."""
    vol = mrcfile.read(shared_data / "relion_sim" / "ref.mrc").astype(np.float64)
    return gridding.prepare_reference(vol)


def test_true_pose_is_local_maximum(shared_data, relion_reference):
    """Clean RELION images (CTF on): every 1-degree or 0.5-pixel step away from the true pose lowers the score."""
    clean = shared_data / "relion_sim" / "clean"
    images, true, ctf, apix = _relion_set(clean / "sim.star", clean / "sim.mrcs", 3)
    prep = score.prepare_images(images, 30, ctf=ctf, apix_A=apix)
    steps = np.diag([1.0, 1.0, 1.0, 0.5, 0.5])
    poses, index = [], []
    for i in range(len(true)):
        poses += [true[i]] + [true[i] + sign * step for step in steps for sign in (-1, 1)]
        index += [i] * 11
    s = score.score(relion_reference, prep, np.array(poses), image_index=np.array(index)).reshape(len(true), 11)
    drops = s[:, :1] - s[:, 1:]
    assert np.all(s[:, 0] > 0.99), f"true-pose scores {s[:, 0]}"
    assert np.all(drops > 0), f"score at truth minus perturbed (phi-,phi+,theta-,...,sy+):\n{drops}"
    print(f"clean RELION: true-pose scores {np.round(s[:, 0], 5)}, smallest drop {drops.min():.2g}")


def test_shift_sign_with_relion_shifted_images(test_data, relion_reference):
    """RELION-made projections with non-zero origins: the score peaks at the true shift, symmetrically, and the
    opposite sign is far worse. This pins the phase ramp's sign to RELION's (= SPARX's, geometry.py)."""
    folder = test_data / "relion_shifted"
    images, true, ctf, apix = _relion_set(folder / "shifted.star", folder / "shifted.mrcs", 3)
    assert np.all(np.abs(true[:, 3:]).sum(axis=1) > 0)
    prep = score.prepare_images(images, 30, ctf=ctf, apix_A=apix)
    steps = [(-0.5, 0), (0.5, 0), (0, -0.5), (0, 0.5)]
    poses, index = [], []
    for i in range(len(true)):
        poses += [true[i]] + [true[i] + [0, 0, 0, dx, dy] for dx, dy in steps] + [true[i] * [1, 1, 1, -1, -1]]
        index += [i] * 6
    s = score.score(relion_reference, prep, np.array(poses), image_index=np.array(index)).reshape(len(true), 6)
    drops = s[:, :1] - s[:, 1:5]
    assert np.all(drops > 0), f"true shift should be a maximum; drops:\n{drops}"
    for pair in (drops[:, 0:2], drops[:, 2:4]):     # -0.5 vs +0.5 along x, then y
        asym = np.abs(pair[:, 0] - pair[:, 1]) / pair.mean(axis=1)
        assert np.all(asym < 0.15), f"drops not symmetric about the true shift: {pair}"
    assert np.all(s[:, 0] - s[:, 5] > 0.3), f"negated shifts should score far lower: {s[:, 0]} vs {s[:, 5]}"
    print(f"RELION shifted: true {np.round(s[:, 0], 4)}, +-0.5 px drops {np.round(drops.min(), 4)}.."
          f"{np.round(drops.max(), 4)}, negated shifts {np.round(s[:, 5], 3)}")


def test_prepare_images_layout(rng):
    m, ou = 24, 9
    images = rng.normal(size=(3, m, m))
    prep = score.prepare_images(images, ou, kmax=10.0)
    n = 2 * m
    assert (prep.M, prep.N, len(prep)) == (m, n, 3) and prep.ctf is None
    k = np.hypot(prep.freqs[:, 0], prep.freqs[:, 1])
    assert np.all((k > 0) & (k <= 10.0)) and np.all(prep.freqs[:, 0] >= 0)
    assert prep.data.shape == (3, len(prep.freqs)) and prep.data.dtype == np.complex128
    np.testing.assert_array_equal(prep.weights, np.where(prep.freqs[:, 0] == 0, 1.0, 2.0))
    # The masked, normalised image: mask-weighted mean 0 and variance 1; the mask is 0.5 at r = ou.
    mask = score.soft_mask(m, ou)
    assert mask[m // 2, m // 2 + ou] == pytest.approx(0.5) and mask[m // 2, m // 2] == 1.0
    assert mask[m // 2, m // 2 + ou + 1] == 0.0 and mask[m // 2, m // 2 + ou - 1] == 1.0
    # Parseval over the kept samples: power = sum over the full disc of |X|^2.
    full = score.prepare_images(images, ou)
    x = np.zeros((n, n))
    mu = (images[0] * mask).sum() / mask.sum()
    sd = np.sqrt((((images[0] - mu) ** 2) * mask).sum() / mask.sum())
    s = n // 2 - m // 2
    x[s:s + m, s:s + m] = mask * (images[0] - mu) / sd
    f2 = np.abs(np.fft.fft2(x)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(n, 1 / n), np.fft.fftfreq(n, 1 / n), indexing="ij")
    assert full.power[0] == pytest.approx(f2[fx ** 2 + fy ** 2 <= (n / 2) ** 2].sum(), rel=1e-12)
    assert f2[0, 0] == pytest.approx(0.0, abs=1e-18 * f2.sum())
    # image_pad = 1: the M x M transform, its samples at even padded-grid frequencies, the Nyquist column kept once.
    own = score.prepare_images(images, ou, image_pad=1)
    assert own.image_pad == 1 and np.all(own.freqs % 2 == 0) and np.abs(own.freqs).max() == n // 2
    np.testing.assert_array_equal(own.weights, np.where(own.freqs[:, 0] % (n // 2) == 0, 1.0, 2.0))
    g = np.abs(np.fft.fft2(x[s:s + m, s:s + m])) ** 2
    gy, gx = np.meshgrid(np.fft.fftfreq(m, 1 / m), np.fft.fftfreq(m, 1 / m), indexing="ij")
    assert own.power[0] == pytest.approx(g[gx ** 2 + gy ** 2 <= (m / 2) ** 2].sum(), rel=1e-12)
    with pytest.raises(ValueError, match="image_pad"):
        score.prepare_images(images, ou, pad=2, image_pad=3)


def test_score_rejects_bad_input(rng):
    m = 16
    ref = gridding.prepare_reference(smooth_map(m, rng))
    prep = score.prepare_images(rng.normal(size=(2, m, m)), 6)
    pose = np.zeros(5)
    with pytest.raises(ValueError, match="image_index"):
        score.score(ref, prep, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="out of range"):
        score.score(ref, prep, np.zeros((1, 5)), image_index=np.array([2]))
    with pytest.raises(ValueError, match="path"):
        score.score(ref, prep, np.zeros((2, 5)), path="gpu")
    with pytest.raises(ValueError, match="same box"):
        score.score(gridding.prepare_reference(smooth_map(18, rng)), prep, np.zeros((2, 5)))
    with pytest.raises(ValueError, match="ou="):
        score.prepare_images(rng.normal(size=(2, m, m)), 8)
    with pytest.raises(ValueError, match="constant"):
        score.prepare_images(np.ones((1, m, m)), 6)
    assert score.score(ref, prep, pose, image_index=np.array([1])).shape == (1,)
