"""kernels/score.cu against the numpy reference (gpu_ali3d.score, path="reference") on seeded random inputs."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_ali3d import gridding, kernels, score
from gpu_ali3d.backend import make_backend
from gpu_ali3d.ctf import CTFParams
from gpu_ali3d.geometry import rotation_matrix
from conftest import smooth_random_map

# Score tolerance. The kernel interpolates in float32 (216 taps of O(1) relative weight: ~1e-7 relative error per
# sample, uncorrelated across samples) and accumulates in float64; measured max |difference| 2e-8 at M = 32..64.
# 1e-5 relative (float32 epsilon x ~100) leaves room for the GPU's different summation order; atol covers scores
# that happen to be near 0, where the same absolute error is a large relative one.
RTOL, ATOL = 1e-5, 1e-7


def _problem(rng, M, n_img, n_pairs, *, interpolation="kb", kb_width=6, with_ctf=True, kmax_frac=None,
             image_pad=None):
    """A smooth random map in a sphere, noisy CTF projections of it at random poses, perturbed poses to score."""
    vol = smooth_random_map(rng, M)
    ref = gridding.prepare_reference(vol, interpolation=interpolation, kb_width=kb_width)
    true = np.column_stack([rng.uniform(0, 360, n_img), rng.uniform(0, 180, n_img), rng.uniform(0, 360, n_img),
                            rng.uniform(-3, 3, (n_img, 2))])
    ctf = None
    if with_ctf:
        ctf = CTFParams(defocus_u_A=rng.uniform(8000, 20000, n_img), defocus_v_A=rng.uniform(8000, 20000, n_img),
                        astig_angle_deg=rng.uniform(0, 180, n_img), voltage_kV=300.0, cs_mm=2.7,
                        amp_contrast=0.1, bfactor_A2=rng.uniform(0, 50, n_img))
    images = gridding.project_reference(ref, true, ctf=ctf, apix_A=2.0)
    images += rng.standard_normal(images.shape) * images.std()
    # kmax = N/2 by default: the samples exactly at Nyquist are kept by both paths
    kmax = ref.N / 2 * (kmax_frac if kmax_frac is not None else 1.0)
    prep = score.prepare_images(images, ou=M // 2 - 2, ctf=ctf, apix_A=2.0, kmax=kmax, image_pad=image_pad)
    idx = rng.integers(0, n_img, n_pairs)
    poses = true[idx] + np.column_stack([rng.normal(0, 5, (n_pairs, 3)), rng.normal(0, 1.5, (n_pairs, 2))])
    return ref, prep, poses, idx


def _reference_power(ref, prep, poses, idx):
    """sum_k w |P_k|^2 per pair in float64 (score.py's ppow), to check the kernel's absolute scale."""
    kx, ky = prep.freqs.T
    rot = rotation_matrix(poses[:, 0], poses[:, 1], poses[:, 2])
    u = rot[:, None, 0, :] * kx[None, :, None] + rot[:, None, 1, :] * ky[None, :, None]
    proj = gridding.sample_reference(ref, u)
    if prep.ctf is not None:
        proj *= prep.ctf[idx]
    return np.einsum("s,bs->b", prep.weights, np.abs(proj) ** 2)


def _run(backend, ref, prep, poses, idx, kmax=None):
    """Kernel sums into a NaN-poisoned output (every element must be written), then the score."""
    xp = backend.xp
    kref = kernels.kernel_reference(backend, ref, kmax=kmax)
    kimg = kernels.kernel_images(backend, prep)
    p = xp.asarray(poses, dtype=np.float64)
    i = xp.asarray(idx, dtype=np.int64)
    out = xp.full((len(poses), 2), np.nan)
    sums = kernels.score_sums(backend, kref, kimg, p, i, out=out)
    assert sums is out
    sums = backend.to_host(sums)
    assert np.all(np.isfinite(sums)), "kernel left output elements unwritten"
    s = backend.to_host(kernels.score_kernel(backend, kref, kimg, p, i))
    return s, sums


@pytest.mark.parametrize("M", [32, 33])
@pytest.mark.parametrize("n_pairs", [1, 300])
def test_score_parity(backend, M, n_pairs):
    rng = np.random.default_rng(100 * M + n_pairs)
    ref, prep, poses, idx = _problem(rng, M, 12, n_pairs)
    expected = score.score(ref, prep, poses, image_index=idx, path="reference")
    got, sums = _run(backend, ref, prep, poses, idx)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    # the absolute scale (a common factor on P cancels in the score): float32 interpolation, same tolerance
    np.testing.assert_allclose(sums[:, 1], _reference_power(ref, prep, poses, idx), rtol=RTOL)
    assert n_pairs == 1 or np.ptp(expected) > 0.2          # the test scores a real spread of values


@pytest.mark.parametrize("case", [
    dict(with_ctf=False),
    dict(kmax_frac=0.6),
    dict(interpolation="trilinear"),
    dict(kb_width=5),                       # odd width: the generic (run-time taps) path
    dict(kb_width=8),
])
def test_score_parity_options(backend, case):
    rng = np.random.default_rng(7)
    ref, prep, poses, idx = _problem(rng, 32, 6, 60, **case)
    expected = score.score(ref, prep, poses, image_index=idx, path="reference")
    got, sums = _run(backend, ref, prep, poses, idx)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(sums[:, 1], _reference_power(ref, prep, poses, idx), rtol=RTOL)


@pytest.mark.parametrize("M, interpolation", [(32, "kb"), (33, "trilinear"), (64, "trilinear")])
def test_score_parity_band_limited(backend, M, interpolation):
    """Refinement's layout: images on their own M x M grid (image_pad 1), samples within a band, and the reference
    cropped to that band for the kernel; the same sums as the whole reference, bitwise, and as numpy."""
    rng = np.random.default_rng(M)
    ref, prep, poses, idx = _problem(rng, M, 8, 80, interpolation=interpolation, kmax_frac=0.37, image_pad=1)
    expected = score.score(ref, prep, poses, image_index=idx, path="reference")
    got, sums = _run(backend, ref, prep, poses, idx, kmax=prep.kmax)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    _, whole = _run(backend, ref, prep, poses, idx)
    np.testing.assert_array_equal(sums, whole)
    kref = kernels.kernel_reference(backend, ref, kmax=prep.kmax)
    assert kref.extent == int(np.ceil(prep.kmax)) < ref.N // 2
    small = kernels.kernel_reference(backend, ref, kmax=prep.kmax - 2)
    with pytest.raises(ValueError, match="cropped"):
        kernels.score_sums(backend, small, kernels.kernel_images(backend, prep), backend.xp.asarray(poses),
                           backend.xp.asarray(idx, dtype=np.int64))


@pytest.mark.parametrize("M, n_img, n_pairs", [(64, 8, 40), (65, 6, 24), (128, 3, 6), (24, 50, 1500)])
def test_score_parity_sizes(backend, M, n_img, n_pairs):
    # the sizes 32, 64, 65, 128, and a batch of thousands-ish pairs at a small box
    rng = np.random.default_rng(M + n_pairs)
    ref, prep, poses, idx = _problem(rng, M, n_img, n_pairs)
    expected = score.score(ref, prep, poses, image_index=idx, path="reference")
    got, _ = _run(backend, ref, prep, poses, idx)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_score_kernel_pairs_pose_i_with_image_i(backend):
    rng = np.random.default_rng(3)
    ref, prep, poses, _ = _problem(rng, 32, 5, 5)
    expected = score.score(ref, prep, poses, path="reference")
    got = backend.to_host(kernels.score_kernel(backend, ref, prep, poses))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_kb_window_table_interpolates_the_window():
    """The kernels' KB table, read as gridding.cuh reads it (linear interpolation), against gridding.kb_weights."""
    ref = gridding.prepare_reference(np.zeros((16, 16, 16)))
    table = kernels.kb_window_table(ref).astype(np.float64)
    size, half = len(table) - 1, ref.kb_width / 2
    d = np.random.default_rng(0).uniform(0, half, 200_000)
    a = d / half * size
    i = a.astype(int)
    got = table[i] + (a - i).astype(np.float32) * (table[i + 1] - table[i])
    assert np.abs(got - gridding.kb_weights(d)).max() < 2e-7


def test_score_sums_checks_arguments():
    backend = make_backend("cpu")
    rng = np.random.default_rng(5)
    ref, prep, poses, idx = _problem(rng, 32, 3, 4)
    kref, kimg = kernels.kernel_reference(backend, ref), kernels.kernel_images(backend, prep)
    p, i = np.ascontiguousarray(poses), idx.astype(np.int64)
    with pytest.raises(TypeError, match="poses must be float64"):
        kernels.score_sums(backend, kref, kimg, p.astype(np.float32), i)
    with pytest.raises(TypeError, match="image_index must be int64"):
        kernels.score_sums(backend, kref, kimg, p, i.astype(np.int32))
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.score_sums(backend, kref, kimg, np.asfortranarray(p), i)
    with pytest.raises(ValueError, match="out of range"):
        kernels.score_sums(backend, kref, kimg, p, i + 10)
    with pytest.raises(ValueError, match="image_index has shape"):
        kernels.score_sums(backend, kref, kimg, p, i[:2])
    bad = kernels.KernelImages(kimg.freqs, kimg.weights, prep.data, kimg.ctf, kimg.power, kimg.N, kimg.k_index,
                               kimg.k_reach)
    with pytest.raises(TypeError, match="data must be complex64"):
        kernels.score_sums(backend, kref, bad, p, i)


@pytest.mark.parametrize("m, kmax, interpolation", [(16, 5.3, "trilinear"), (16, None, "trilinear"), (15, 7.0, "kb"),
                                                     (16, 15.5, "kb"), (12, 11.2, "kb")])
def test_band_reference_is_the_crop_of_the_prepared_reference(backend, m, kmax, interpolation):
    """The alignment's reference made on the device for the band only holds exactly the values of the host's
    whole prepared reference cropped by kernel_reference, halo and Friedel mates (u_x < 0, u_x > N/2) included."""
    from gpu_ali3d.gridding import prepare_reference

    vol = np.random.default_rng(m).standard_normal((m, m, m))
    whole = kernels.kernel_reference(backend, prepare_reference(vol, pad=2, interpolation=interpolation), kmax=kmax)
    band = kernels.band_reference(backend, vol, kmax, pad=2, interpolation=interpolation)
    assert (band.N, band.halo, band.taps, band.kind, band.extent) == (whole.N, whole.halo, whole.taps, whole.kind,
                                                                      whole.extent)
    np.testing.assert_array_equal(backend.to_host(band.data), backend.to_host(whole.data))
    np.testing.assert_array_equal(backend.to_host(band.window), backend.to_host(whole.window))


def test_band_reference_on_the_standin_is_the_cpu_one(standin_backend):
    """The same gathers through the strict stand-in (device arrays only, no host operand): the CPU's values."""
    vol = np.random.default_rng(3).standard_normal((16, 16, 16))
    host = kernels.band_reference(make_backend("cpu"), vol, 9.5, pad=2, interpolation="trilinear")
    dev = kernels.band_reference(standin_backend, vol, 9.5, pad=2, interpolation="trilinear")
    np.testing.assert_array_equal(standin_backend.to_host(dev.data), host.data)


def test_cpu_flags_fuse_only_the_objective(monkeypatch):
    """The objective's kernels (score.cu, align.cu) are built for x86-64-v3 where the host runs it, so their explicit
    fmadd fuse; the insertion keeps the baseline build (the GPU's --fmad=false rounding). Every build keeps the
    compiler from contracting on its own. $GPU_ALI3D_CPU_BASELINE builds every kernel for the baseline."""
    for name in kernels.kernel_names():
        assert "-ffp-contract=off" in kernels.cpu_flags(name)
        fast = name in kernels.FAST_MODULES and kernels.cpu_has_fma()
        assert ("-march=x86-64-v3" in kernels.cpu_flags(name)) == fast, name
    assert "insert" not in kernels.FAST_MODULES
    monkeypatch.setenv("GPU_ALI3D_CPU_BASELINE", "1")
    kernels.cpu_has_fma.cache_clear()
    try:
        assert all(kernels.cpu_flags(name) == kernels.CPU_FLAGS for name in kernels.kernel_names())
    finally:
        monkeypatch.delenv("GPU_ALI3D_CPU_BASELINE")
        kernels.cpu_has_fma.cache_clear()


def test_fused_and_baseline_builds_score_alike(monkeypatch):
    """score.cu built with fused multiply-adds (x86-64-v3) and for baseline x86-64 give the same scores to float
    tolerance, and each matches the numpy reference (the parity tests run whichever build this host gets)."""
    if not kernels.cpu_has_fma():
        pytest.skip("this host does not run x86-64-v3 code: only the baseline build exists here")
    rng = np.random.default_rng(5)
    ref, prep, poses, idx = _problem(rng, 32, 4, 200, interpolation="trilinear")
    want = score.score(ref, prep, poses, image_index=idx, path="reference")
    got = {}
    for baseline in (False, True):
        if baseline:
            monkeypatch.setenv("GPU_ALI3D_CPU_BASELINE", "1")
        kernels.cpu_has_fma.cache_clear()
        kernels._cpu_function.cache_clear()
        try:
            got[baseline] = _run(make_backend("cpu"), ref, prep, poses, idx)[0]
        finally:
            monkeypatch.delenv("GPU_ALI3D_CPU_BASELINE", raising=False)
            kernels.cpu_has_fma.cache_clear()
            kernels._cpu_function.cache_clear()
    for s in got.values():
        np.testing.assert_allclose(s, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got[False], got[True], rtol=RTOL, atol=ATOL)
    assert not np.array_equal(got[False], got[True]), "the fused build rounds as the baseline: no fma was used"
