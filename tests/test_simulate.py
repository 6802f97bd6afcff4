"""Synthetic data: exact pose perturbations, the requested SNR, determinism, uniform orientations, an asymmetric
phantom."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import affine_transform
from scipy.spatial.transform import Rotation

from gpu_ali3d.geometry import projection_direction, rotation_matrix
from gpu_ali3d.io.stack import ArrayImages
from gpu_ali3d.projection import project
from gpu_ali3d.simulate import phantom, simulate


def _sim(seed=5, n=40, box=24, **kw):
    args = dict(apix_A=3.0, snr=0.5, angle_error_deg=4.0, shift_error_px=1.5, ctf=True)
    args.update(kw)
    return simulate(phantom(box), n, rng=np.random.default_rng(seed), **args)


def test_stack_layout():
    stack, truth = _sim()
    assert len(stack) == 40 and stack.box == 24 and stack.apix_A == 3.0
    assert isinstance(stack.images, ArrayImages) and stack.image_refs is None
    assert stack.read_images().dtype == np.float32
    assert truth.shape == (40, 5) and truth.dtype == np.float64 and np.all(truth[:, 3:] == 0)
    assert len(stack.ctf) == 40 and np.all(stack.ctf.defocus_u_A >= stack.ctf.defocus_v_A)
    mean_df = 0.5 * (stack.ctf.defocus_u_A + stack.ctf.defocus_v_A)
    assert np.all((mean_df >= 10000) & (mean_df <= 30000))
    assert np.all(stack.ctf.defocus_u_A - stack.ctf.defocus_v_A <= 300)
    np.testing.assert_array_equal(stack.meta["rlnRandomSubset"], np.arange(40) % 2 + 1)
    assert _sim(ctf=False)[0].ctf is None


@pytest.mark.parametrize("angle_deg, shift_px", [(4.0, 1.5), (0.5, 0.0), (25.0, 3.25)])
def test_perturbations_are_exact(angle_deg, shift_px):
    stack, truth = _sim(n=200, box=12, angle_error_deg=angle_deg, shift_error_px=shift_px, snr=np.inf)
    r_true = rotation_matrix(truth[:, 0], truth[:, 1], truth[:, 2])
    r_start = rotation_matrix(stack.poses[:, 0], stack.poses[:, 1], stack.poses[:, 2])
    angle = np.rad2deg(Rotation.from_matrix(r_start @ np.swapaxes(r_true, 1, 2)).magnitude())
    np.testing.assert_allclose(angle, angle_deg, atol=1e-6)
    offsets = stack.poses[:, 3:] - truth[:, 3:]
    np.testing.assert_allclose(np.hypot(offsets[:, 0], offsets[:, 1]), shift_px, atol=1e-9)
    if shift_px:
        # Random directions: the mean offset is small compared with its length.
        assert np.linalg.norm(offsets.mean(axis=0)) < 0.3 * shift_px


@pytest.mark.parametrize("snr", [0.1, 2.0])
def test_snr_and_unit_noise(snr):
    """The stream does not depend on snr, so the same seed at snr = inf gives the noise-free part exactly."""
    box, n = 32, 60
    noisy, truth = _sim(n=n, box=box, snr=snr)
    clean, truth_clean = _sim(n=n, box=box, snr=np.inf)
    np.testing.assert_array_equal(truth, truth_clean)
    signal = np.sqrt(snr) * clean.read_images().astype(np.float64)
    noise = noisy.read_images() - signal
    axis = np.arange(box) - box // 2
    disc = np.hypot(axis[:, None], axis[None, :]) <= 0.4 * box
    # Unit noise variance; n * box^2 = 61440 Gaussian samples: the sample variance has sd sqrt(2 / N) ~ 0.6 %.
    assert abs(noise.var() - 1.0) < 0.03
    assert abs(noise.mean()) < 0.02
    # The requested ratio, measured with the noise realisation (~25000 samples inside the disc: sd ~ 0.9 %).
    measured = signal[:, disc].var() / noise[:, disc].var()
    assert abs(measured / snr - 1.0) < 0.05, f"measured SNR {measured:.4f}, asked {snr}"
    # The noise-free part is the CTF-modulated projection at the TRUE poses (not the perturbed start).
    ref = project(phantom(box).astype(np.float64), truth, ctf=noisy.ctf, apix_A=3.0)
    scale = (ref * signal).sum() / (ref * ref).sum()
    np.testing.assert_allclose(signal, scale * ref, atol=1e-5 * np.abs(signal).max())   # float32 images


def test_deterministic_per_seed():
    a, ta = _sim(seed=11)
    b, tb = _sim(seed=11)
    c, tc = _sim(seed=12)
    np.testing.assert_array_equal(a.read_images(), b.read_images())
    np.testing.assert_array_equal(a.poses, b.poses)
    np.testing.assert_array_equal(ta, tb)
    assert a.ctf.allclose(b.ctf, rtol=0, atol=0)
    assert not np.allclose(ta, tc)
    assert not np.allclose(a.read_images(), c.read_images())


def test_orientations_uniform():
    n = 3000
    _, truth = _sim(n=n, box=8, snr=np.inf, ctf=False)
    d = projection_direction(truth[:, 0], truth[:, 1])
    # Uniform directions: each component of the mean has sd 1 / sqrt(3 n) ~ 0.011.
    assert np.all(np.abs(d.mean(axis=0)) < 0.05)
    # cos(theta) uniform on [-1, 1]: quartiles at -0.5, 0, 0.5 (sd of a quartile estimate ~ 0.016).
    np.testing.assert_allclose(np.quantile(d[:, 2], [0.25, 0.5, 0.75]), [-0.5, 0.0, 0.5], atol=0.06)
    # In-plane angle uniform: the mean of exp(i psi) is ~ 0 (sd 1 / sqrt(2 n) ~ 0.013).
    assert abs(np.exp(1j * np.deg2rad(truth[:, 2])).mean()) < 0.05


def test_phantom_deterministic_unit_variance_and_compact():
    v = phantom(32)
    assert v.dtype == np.float32 and v.shape == (32, 32, 32)
    np.testing.assert_array_equal(v, phantom(32))
    assert abs(float(v.std()) - 1.0) < 1e-5 and v.min() >= 0
    axis = np.arange(32) - 16
    radius = np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
    assert np.all(v[radius > 0.44 * 32] == 0)
    assert not np.array_equal(v, phantom(32, rng=np.random.default_rng(1)))


@pytest.mark.parametrize("rot", [("z", 90), ("z", 180), ("x", 180), ("y", 120), ("xyz", (30, 60, 90))])
def test_phantom_not_symmetric(rot):
    box = 40
    v = phantom(box).astype(np.float64)
    # Rotate the density about the centre voxel (box // 2) by resampling: out(r) = v(A r).
    a = Rotation.from_euler(rot[0], rot[1], degrees=True).as_matrix()[::-1, ::-1]   # (x, y, z) -> (z, y, x)
    c = np.full(3, box // 2)
    rotated = affine_transform(v, a, offset=c - a @ c, order=1)
    same = affine_transform(v, np.eye(3), order=1)
    corr = np.corrcoef(v.ravel(), rotated.ravel())[0, 1]
    assert np.corrcoef(v.ravel(), same.ravel())[0, 1] > 0.999
    assert corr < 0.7, f"phantom correlates {corr:.3f} with itself rotated by {rot}"


def test_validation():
    vol = phantom(8)
    ok = dict(apix_A=1.0, snr=1.0, angle_error_deg=1.0, shift_error_px=1.0, ctf=False, rng=np.random.default_rng(0))
    for bad, match in ((dict(snr=0), "snr"), (dict(apix_A=-1), "apix_A"), (dict(angle_error_deg=-1), "angle"),
                       (dict(shift_error_px=np.nan), "shift"), (dict(defocus_range_A=(3e4, 1e4)), "defocus")):
        with pytest.raises(ValueError, match=match):
            simulate(vol, 3, **{**ok, **bad})
    with pytest.raises(TypeError, match="Generator"):
        simulate(vol, 3, **{**ok, "rng": 1})
    with pytest.raises(ValueError, match="cube"):
        simulate(np.zeros((8, 8, 9)), 3, **ok)
    with pytest.raises(ValueError, match="box"):
        phantom(4)
