"""kernels/align.cu (a batch of simplices in one launch) against simplex.amoeba_batched, and align_poses' fused
path against its numpy reference path on the RELION-simulated particles."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gpu_ali3d import gridding, kernels, score, simplex
from gpu_ali3d.alignment import align_kernel, align_poses, prepare_full_band
from gpu_ali3d.backend import make_backend
from gpu_ali3d.ctf import CTFParams
from gpu_ali3d.geometry import angular_distance, shift_distance
from gpu_ali3d.io.formats import read_stack
from gpu_ali3d.options import RefineOptions
from conftest import smooth_random_map


def _random_ctf(rng, n):
    """CTF parameters of n particles: defocus 0.8-2 um, astigmatic, B-factors up to 50 A^2."""
    return CTFParams(defocus_u_A=rng.uniform(8000, 20000, n), defocus_v_A=rng.uniform(8000, 20000, n),
                     astig_angle_deg=rng.uniform(0, 180, n), voltage_kV=300.0, cs_mm=2.7, amp_contrast=0.1,
                     bfactor_A2=rng.uniform(0, 50, n))


def _problem(rng, n, *, interpolation, with_ctf, M=32):
    """A smooth random map in a sphere, noisy (CTF) projections at random poses, starts a few degrees off."""
    vol = smooth_random_map(rng, M)
    ref = gridding.prepare_reference(vol, interpolation=interpolation)
    true = np.column_stack([rng.uniform(0, 360, n), rng.uniform(0, 180, n), rng.uniform(0, 360, n),
                            rng.uniform(-3, 3, (n, 2))])
    ctf = _random_ctf(rng, n) if with_ctf else None
    images = gridding.project_reference(ref, true, ctf=ctf, apix_A=4.0)
    images += rng.standard_normal(images.shape) * images.std()
    prep = score.prepare_images(images, ou=M // 2 - 2, ctf=ctf, apix_A=4.0, kmax=0.3 * ref.N, image_pad=1)
    x0 = true + np.column_stack([rng.normal(0, 3, (n, 3)), rng.normal(0, 1, (n, 2))])
    return ref, prep, x0


def _convert(backend, ref, prep, x0):
    xp = backend.xp
    kref = kernels.kernel_reference(backend, ref, kmax=prep.kmax)
    kimg = kernels.kernel_images(backend, prep)
    x0 = xp.ascontiguousarray(xp.asarray(x0, dtype=np.float64))
    return kref, kimg, x0, simplex.local_ali3d_scales(x0[:, 1], 2.0, 2.0, xp=xp)


@pytest.mark.parametrize("interpolation", ["kb", "trilinear"])
@pytest.mark.parametrize("with_ctf", [True, False])
def test_fused_kernel_follows_amoeba_batched(backend, interpolation, with_ctf):
    """One launch of align.cu gives, image by image, the steps, poses and scores of amoeba_batched driven by
    score.cu (the lockstep reference), and the score at the start."""
    rng = np.random.default_rng(11 + with_ctf)
    ref, prep, x0 = _problem(rng, 36, interpolation=interpolation, with_ctf=with_ctf)
    kref, kimg, x0, scales = _convert(backend, ref, prep, x0)
    xp, host = backend.xp, backend.to_host
    best, fbest, steps, evals, f0 = (host(a) for a in align_kernel(backend, kref, kimg, x0, scales,
                                                                    **simplex.SPARX_SERIAL))
    objective = score.make_objective(kref, prep, backend=backend)
    points = [0]

    def counted(p, owner):
        points[0] += p.shape[0]
        return objective(p, owner)

    want_x, want_f, want_steps = (host(a) for a in simplex.amoeba_batched(counted, x0, scales, xp=xp,
                                                                             **simplex.SPARX_SERIAL))
    want_f0 = host(objective(x0, xp.arange(len(kimg))))
    # Both paths evaluate every point with the same device code (score.cuh score_pair, block_sum over the same
    # thread layout) and the same float64 bookkeeping in the same operation order (simplex.py's rules), so each
    # decision and each pose is expected bitwise equal; measured on the CPU: all 36 images bitwise, on all four
    # cases. The tolerance leaves room for a change of summation order in one of the two kernels (a reordered
    # block_sum moves a score by ~1e-16 relative, which can flip a near-tie comparison and send one simplex down
    # another path): at most 1 image in 12 may differ, and every other must agree to 1e-9 (deg, px, score).
    same = (steps == want_steps) & (np.abs(best - want_x).max(axis=1) <= 1e-9) & (np.abs(fbest - want_f) <= 1e-9)
    assert same.mean() >= 11 / 12, f"{np.count_nonzero(~same)} of {len(same)} images differ: {np.nonzero(~same)[0]}"
    np.testing.assert_allclose(f0, want_f0, rtol=0, atol=1e-12)
    assert np.all(fbest >= f0) and np.all(steps > 0) and np.all(steps < simplex.SPARX_SERIAL["itmax"])
    # evaluations: the 6 initial vertices, one reflection per step, then an expansion or 5 (6) shrunk vertices
    assert np.all(evals >= 6 + steps) and np.all(evals <= 6 + 7 * steps)
    if same.all():
        assert int(evals.sum()) == points[0]
    print(f"{interpolation} ctf={with_ctf}: {same.sum()}/{len(same)} images identical, mean steps "
          f"{steps.mean():.1f}, evaluations {evals.mean():.1f} per image")


def test_start_without_signal_is_kept_and_nan_runs_to_itmax(backend):
    """An image with no data (every score 0: the denominator is 0) keeps its start exactly after the all-equal
    shrinks; an image whose scores are NaN never converges (simplex.py: a NaN at vertex 0 makes frange NaN) and
    stops at itmax. Both exactly as amoeba_batched on the same objective."""
    rng = np.random.default_rng(3)
    ref, prep, x0 = _problem(rng, 4, interpolation="trilinear", with_ctf=False)
    data, power = prep.data.copy(), prep.power.copy()
    data[1], power[1] = 0.0, 0.0
    data[2, 0] = np.nan                        # power stays finite: every score of image 2 is NaN
    prep = dataclasses.replace(prep, data=data, power=power)
    kref, kimg, x0, scales = _convert(backend, ref, prep, x0)
    controls = {"ftol": 1e-4, "xtol": 1e-4, "itmax": 60}
    best, fbest, steps, evals, f0 = (backend.to_host(a) for a in align_kernel(backend, kref, kimg, x0, scales,
                                                                               **controls))
    start = backend.to_host(x0)
    # no signal: every step shrinks all vertices halfway to vertex 0 (the start); the mean scaled distance of the
    # worst vertex from the centroid starts at 1/5 and halves per step, so it passes 1e-4 after 11 steps
    np.testing.assert_array_equal(best[1], start[1])
    assert (fbest[1], f0[1], steps[1], evals[1]) == (0.0, 0.0, 11, 6 + 11 * 7)
    assert steps[2] == 60 and np.isnan(f0[2])
    objective = score.make_objective(kref, prep, backend=backend)
    want_x, want_f, want_steps = (backend.to_host(a) for a in simplex.amoeba_batched(objective, x0, scales,
                                                                                     xp=backend.xp, **controls))
    np.testing.assert_array_equal(steps, want_steps)
    np.testing.assert_array_equal(best[[0, 1, 3]], want_x[[0, 1, 3]])
    np.testing.assert_array_equal(fbest[[0, 1, 3]], want_f[[0, 1, 3]])
    assert np.all(fbest[[0, 3]] > f0[[0, 3]])          # a real image improves on its start


def test_align_kernel_checks_arguments():
    backend = make_backend("cpu")
    ref, prep, x0 = _problem(np.random.default_rng(5), 3, interpolation="trilinear", with_ctf=True)
    kref, kimg, x0, scales = _convert(backend, ref, prep, x0)
    ok = dict(ftol=1e-4, xtol=1e-4, itmax=500)
    with pytest.raises(TypeError, match="x0 must be float64"):
        align_kernel(backend, kref, kimg, x0.astype(np.float32), scales, **ok)
    with pytest.raises(ValueError, match=r"x0 has shape \(2, 5\); expected \(3, 5\)"):
        align_kernel(backend, kref, kimg, x0[:2].copy(), scales, **ok)
    with pytest.raises(ValueError, match="scales has shape"):
        align_kernel(backend, kref, kimg, x0, scales[:, :3].copy(), **ok)
    with pytest.raises(ValueError, match="C-contiguous"):
        align_kernel(backend, kref, kimg, np.asfortranarray(x0), scales, **ok)
    with pytest.raises(ValueError, match="finite and nonzero"):
        align_kernel(backend, kref, kimg, x0, scales * 0.0, **ok)
    with pytest.raises(ValueError, match="both <= 0"):
        align_kernel(backend, kref, kimg, x0, scales, ftol=0.0, xtol=0.0, itmax=500)
    with pytest.raises(ValueError, match="itmax"):
        align_kernel(backend, kref, kimg, x0, scales, ftol=1e-4, xtol=1e-4, itmax=-1)
    bad = kernels.KernelImages(kimg.freqs, kimg.weights, prep.data, kimg.ctf, kimg.power, kimg.N, kimg.k_index,
                               kimg.k_reach)
    with pytest.raises(TypeError, match="data must be complex64"):
        align_kernel(backend, kref, bad, x0, scales, **ok)
    small = kernels.kernel_reference(backend, ref, kmax=4)
    with pytest.raises(ValueError, match="cropped to 4"):
        align_kernel(backend, small, kimg, x0, scales, **ok)
    other = kernels.kernel_reference(backend, gridding.prepare_reference(np.zeros((16,) * 3)))
    with pytest.raises(ValueError, match="reference N=32 but images N=64"):
        align_kernel(backend, other, kimg, x0, scales, **ok)


@pytest.fixture(scope="module")
def relion_noisy(shared_data):
    """32 of the 400 noisy RELION particles (start poses 4 deg and 1.5 px from the truth), and a reference
    reconstructed from all 400 at their true poses, low-passed as ref_ali3d would at (0.2, 0.1)."""
    from gpu_ali3d.reconstruct import reconstruct
    from gpu_ali3d.resolution import filt_tanl

    folder = shared_data / "relion_sim" / "noisy"
    start, truth = read_stack(folder / "start.star"), read_stack(folder / "truth.star")
    images = start.read_images()
    vol = reconstruct(images, truth.poses, ctf=start.ctf, apix_A=start.apix_A)      # numpy insertion: 1 s
    cutoff, falloff = 0.2, 0.1
    sub = np.arange(0, 400, 12)[:32]
    return images[sub], start.poses[sub], start.ctf[sub], start.apix_A, filt_tanl(vol, cutoff, falloff), \
        (cutoff, falloff), truth.poses[sub]


#: A falling noise spectrum per ring of a 64-pixel box (rings 0..32), as a micrograph's: the whitened objective's.
FALLING_SPECTRUM = 1.0 + 4.0 / (1.0 + (np.arange(33) / 6.0) ** 2)


@pytest.mark.parametrize("interpolation,spectrum", [("kb", None), ("trilinear", None),
                                                    ("trilinear", FALLING_SPECTRUM)], ids=["kb", "trilinear",
                                                                                            "trilinear-whitened"])
def test_align_poses_fused_matches_the_reference_path(backend, relion_noisy, interpolation, spectrum):
    """One alignment of 32 noisy particles (CTF on, two batches): the fused float32 kernel against the numpy
    float64 objective with amoeba_batched, plain and whitened. Issue 15's criterion: median pose difference
    < 0.01 deg."""
    images, start, ctf, apix, volf, (cutoff, falloff), truth = relion_noisy
    opts = RefineOptions(interpolation=interpolation, batch=20)
    fused = align_poses(images, start, volf, ctf, apix, 30, opts, cutoff, falloff, backend, False, "fused",
                        noise_spectrum=spectrum)
    reference = align_poses(images, start, volf, ctf, apix, 30, opts, cutoff, falloff, None, False, "reference",
                            noise_spectrum=spectrum)
    angle = angular_distance(fused[0], reference[0])
    shift = shift_distance(fused[0], reference[0])
    assert np.median(angle) < 0.01 and np.median(shift) < 0.01, (np.median(angle), np.median(shift))
    assert fused[3] == reference[3]                                     # the same band limit
    # the starts are scored alike (float32 interpolation against float64: the score kernel's 1e-5 relative)
    np.testing.assert_allclose(fused[1], reference[1], rtol=1e-5, atol=1e-7)
    assert np.all(fused[2] >= fused[1]) and np.all(reference[2] >= reference[1])
    err_start = np.median(angular_distance(start, truth))
    err_fused = np.median(angular_distance(fused[0], truth))
    assert err_fused < 0.5 * err_start, (err_start, err_fused)          # 4.0 -> about 1.2-1.3 deg (measured)
    print(f"{interpolation}: fused vs reference median {np.median(angle):.2g} deg, {np.median(shift):.2g} px; "
          f"error vs truth {err_start:.2f} -> {err_fused:.2f} deg; work fused {fused[4]}, reference {reference[4]}")


def _kernel_images_equal(a, b, xp_host):
    for field in ("freqs", "weights", "data", "ctf", "power"):
        x, y = getattr(a, field), getattr(b, field)
        if x is None or y is None:
            assert x is None and y is None, field
            continue
        np.testing.assert_array_equal(xp_host(x), xp_host(y), err_msg=field)
    assert (a.N, a.k_index, a.k_reach) == (b.N, b.k_index, b.k_reach)


@pytest.mark.parametrize("with_ctf,whitened", [(True, False), (False, False), (True, True), (False, True)])
def test_full_band_images_give_each_band_bit_for_bit(backend, rng, with_ctf, whitened):
    """Images prepared once at every frequency (prepare_full_band, two batches) and cut to a band limit give the
    KernelImages that preparing those images for that band gives, for bands from a few pixels to Nyquist and for
    a subset of the images in another order (a chunk of a run); whitened alike where a noise spectrum is given."""
    n, M = 9, 32
    vol = smooth_random_map(rng, M)
    ref = gridding.prepare_reference(vol)
    poses = np.column_stack([rng.uniform(0, 360, n), rng.uniform(0, 180, n), rng.uniform(0, 360, n),
                             rng.uniform(-3, 3, (n, 2))])
    ctf = _random_ctf(rng, n) if with_ctf else None
    images = gridding.project_reference(ref, poses, ctf=ctf, apix_A=4.0) + rng.standard_normal((n, M, M))
    spectrum = FALLING_SPECTRUM[:M // 2 + 1] if whitened else None
    full = prepare_full_band(images, ctf, 4.0, 13, backend, batch=4, noise_spectrum=spectrum)
    assert len(full) == n
    rows = np.array([7, 2, 3, 0])
    for kmax in (4.0, 11.3, 20.0, float(M)):
        got = full.band(backend, kmax, rows)
        prep = score.prepare_images(images[rows], 13, ctf=None if ctf is None else ctf[rows], apix_A=4.0,
                                    kmax=kmax, image_pad=1, whiten=spectrum, xp=backend.xp)
        _kernel_images_equal(got, kernels.kernel_images(backend, prep), backend.to_host)


def test_align_poses_from_the_full_band_gives_the_same_poses(backend, relion_noisy):
    """align_poses with the images prepared once for the run (refine's path) gives the poses, scores and counts of
    align_poses preparing them itself: bit for bit."""
    images, start, ctf, apix, volf, (cutoff, falloff), truth = relion_noisy
    opts = RefineOptions(batch=20)
    rows = np.arange(len(images))[::-1].copy()
    full = prepare_full_band(images[::-1], ctf[rows], apix, 30, backend)
    want = align_poses(images, start, volf, ctf, apix, 30, opts, cutoff, falloff, backend, False, "")
    got = align_poses(images, start, volf, ctf, apix, 30, opts, cutoff, falloff, backend, False, "",
                      full_band=full, rows=rows)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="one row per pose"):
        align_poses(images, start, volf, ctf, apix, 30, opts, cutoff, falloff, backend, False, "",
                    full_band=full, rows=rows[:3])
