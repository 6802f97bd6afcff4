"""Trilinear insertion (reconstruct.insert_transforms_trilinear, kernels/insert.cu trilinear mode) and the Wiener
terms from the data (reconstruct.wiener_regularisation).

The defect this insertion fixes: SPARX's nn4_ctf evaluates the CTF on zero-padded image transforms, whose
in-between samples interpolate CTF x projection; at high defocus the CTF oscillates faster than the box's Fourier
sampling, so those samples do not follow the analytic CTF and the map loses its high frequencies even from
noise-free images at their true poses. Trilinear insertion keeps the samples where the image was measured (its own
M x M grid, with the CTF there) and spreads them into the padded grid (RELION's back-projection)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from gpu_ali3d import local_ali3d
from gpu_ali3d import reconstruct as rec
from gpu_ali3d.ctf import CTFParams
from gpu_ali3d.geometry import euler_from_matrix
from gpu_ali3d.io.formats import read_volume
from gpu_ali3d.io.stack import ArrayImages, ParticleStack
from gpu_ali3d.projection import project
from gpu_ali3d.resolution import fsc, sphere_mask

APIX_A = 1.5      # the small-particle, high-resolution regime of issue 14 (Nyquist 3 A)


def _poses(n, seed, shifts=0.0):
    rng = np.random.default_rng(seed)
    phi, theta, psi = euler_from_matrix(Rotation.random(n, random_state=seed).as_matrix())
    return np.column_stack([phi, theta, psi, rng.uniform(-shifts, shifts, n), rng.uniform(-shifts, shifts, n)])


def _ctf(n, seed):
    """RELION-like CTFs: 300 kV, Cs 2.7 mm, Q 0.1, defocus 1-3 um with up to 300 A astigmatism."""
    rng = np.random.default_rng(seed)
    df = rng.uniform(10000, 30000, n)
    return CTFParams(df + rng.uniform(0, 300, n), df, rng.uniform(0, 180, n), 300.0, 2.7, 0.1, 0.0)


@pytest.mark.parametrize("m, n, sym, ctf_kind, deterministic", [
    (32, 40, "c1", "each", True), (32, 25, "d2", "none", True), (33, 20, "c1", "each", False),
    (64, 60, "c1", "each", True)])
def test_kernel_matches_the_reference(backend, rng, m, n, sym, ctf_kind, deterministic):
    images = rng.normal(size=(n, m + (m % 2), m + (m % 2))).astype(np.float32)[:, :m, :m]
    images = np.ascontiguousarray(images)
    poses = _poses(n, 3, shifts=3.0)
    ctf = None if ctf_kind == "none" else _ctf(n, 4)
    npad = 2
    ref = rec.new_accumulator(m, npad=npad, sym=sym, insertion="trilinear")
    rec.insert(ref, images, poses, ctf=ctf, apix_A=APIX_A)
    acc = rec.new_accumulator(m, npad=npad, sym=sym, insertion="trilinear")
    acc.data, acc.weights = backend.xp.asarray(acc.data), backend.xp.asarray(acc.weights)
    rec.insert(acc, images, poses, ctf=ctf, apix_A=APIX_A, backend=backend, deterministic=deterministic)
    data, weights = backend.to_host(acc.data), backend.to_host(acc.weights)
    # the kernel reads complex64 transforms and float32 CTFs (the reference: float64). The float32 CTF's phase
    # gamma (tens of radians at 1.5 A/px) is good to ~1e-5 rad, so near a CTF zero a value is off by up to ~1e-5
    # of its scale (measured: 2.0e-5 of the largest voxel at M = 33): allow 1e-4
    scale_d, scale_w = np.abs(ref.data).max(), np.abs(ref.weights).max()
    np.testing.assert_allclose(data, ref.data, rtol=0, atol=1e-4 * scale_d)
    np.testing.assert_allclose(weights, ref.weights, rtol=0, atol=1e-4 * scale_w)
    assert ((weights > 0) == (ref.weights > 0)).mean() > 0.9999       # the same voxels reached


def test_each_sample_spreads_its_value_and_weight_over_eight_voxels(rng):
    m = 16
    image = rng.normal(size=(1, m, m))
    pose = _poses(1, 9)
    acc = rec.new_accumulator(m, npad=2, insertion="trilinear")
    rec.insert(acc, image, pose)
    keep, _, _ = rec._kept_samples(m)
    # every kept sample adds a total weight of 1 (no CTF), so the grid holds one unit per sample
    assert acc.weights.sum() == pytest.approx(keep.sum(), rel=1e-12)
    transforms, _ = rec.slice_transforms(image, pose, npad=1)
    values = transforms[0][keep]
    # sum over voxels of data = sum of the samples' values, Friedel-flipped ones conjugated (real part unchanged)
    assert acc.data.real.sum() == pytest.approx(values.real.sum(), rel=1e-9)


def _noise_free_set(map_path, m, n, seed):
    vol, _ = read_volume(map_path)
    vol = np.asarray(vol, np.float64)[:m, :m, :m]
    # a particle inside its box, as in real data: the map within a sphere of radius 0.45 M, soft edge
    vol = (vol - vol.mean()) * sphere_mask(m, 0.45 * m, soft_edge=3)
    vol /= vol.std()
    poses = _poses(n, seed)
    ctf = _ctf(n, seed + 1)
    images = project(vol, poses, ctf=ctf, apix_A=APIX_A).astype(np.float32)   # the CTF on the M x M grid, as RELION
    stack = ParticleStack(images=ArrayImages(images), poses=poses, apix_A=APIX_A, ctf=ctf)
    return vol, stack


@pytest.mark.parametrize("map_name, m, n", [("relion_sim/ref.mrc", 64, 1000), ("gpcr7cfn_128.mrc", 128, 1000)])
def test_noise_free_ctf_images_reconstruct_the_map_to_nyquist(shared_data, tmp_path, map_name, m, n):
    """Issue 14's test: noise-free CTF images at their true poses, refine --CTF --maxit 0 (trilinear insertion at
    npad 2, the default): FSC against the true map >= 0.99 up to 0.9 of Nyquist with the Wiener terms from the
    data (--snr auto); and the same data through SPARX's nn4 insertion fall far below (the defect this fixes)."""
    vol, stack = _noise_free_set(shared_data / map_name, m, n, seed=m)
    top = int(0.9 * m / 2)
    result = {}
    for insertion in ("trilinear", "nn4"):
        out = tmp_path / insertion
        local_ali3d(stack, out, maxit=0, CTF=True, snr=None, insertion=insertion, device="cpu", progress=False)
        rebuilt, _ = read_volume(out / "map.mrc")
        result[insertion] = np.asarray(fsc(np.asarray(rebuilt, np.float64), vol).fsc)[1:top + 1]
    print(f"box {m}: FSC to 0.9 Nyquist, min: trilinear {result['trilinear'].min():.4f}, "
          f"nn4 {result['nn4'].min():.4f}")
    assert result["trilinear"].min() >= 0.99, result["trilinear"]
    assert result["nn4"].min() < 0.9           # SPARX's insertion with the CTF: the defect, still there as an option


def test_wiener_terms_follow_the_half_sets_fsc():
    m, n = 32, 400
    vol = np.zeros((m, m, m))
    vol[10:20, 12:22, 8:24] = 1.0
    vol = vol * sphere_mask(m, 0.4 * m, soft_edge=2)
    poses = _poses(n, 5)
    images = project(vol, poses)
    rng = np.random.default_rng(6)
    terms = {}
    for sigma in (0.0, 30.0):
        noisy = images + sigma * rng.normal(size=images.shape)
        a, b = rec.accumulate_halves(noisy, poses, npad=2, insertion="trilinear", snr=None)
        terms[sigma] = rec.wiener_regularisation(a, b)
        assert np.all(np.isfinite(terms[sigma])) and np.all(terms[sigma] >= 0)
    low = slice(1, m // 4)
    # noise-free: the halves agree, the terms are tiny against the weights; with noise they are larger everywhere
    assert np.all(terms[30.0][low] > 10 * terms[0.0][low]), (terms[0.0][low], terms[30.0][low])
    a, b = rec.accumulate_halves(images, poses, npad=2, insertion="trilinear", snr=None)
    with pytest.raises(ValueError, match="insertion"):
        rec.wiener_regularisation(a, rec.new_accumulator(m, npad=2, insertion="nn4"))


def test_insertion_is_checked():
    with pytest.raises(ValueError, match="insertion"):
        rec.new_accumulator(16, insertion="cubic")
    acc = rec.new_accumulator(16, npad=2, insertion="trilinear")
    with pytest.raises(ValueError, match="insertion trilinear"):
        rec.insert_transforms_trilinear(acc, np.zeros((1, 32, 17), complex), None, _poses(1, 1), ctf=False)
    with pytest.raises(ValueError, match="insertion"):
        rec.add(acc, rec.new_accumulator(16, npad=2))
