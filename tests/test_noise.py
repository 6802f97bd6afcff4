"""gpu_ali3d.noise (the images' noise spectrum from their background) and the whitened objective it gives
(score.prepare_images ``whiten``; refine's --objective whitened)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gpu_ali3d import gridding, noise, score
from gpu_ali3d.score import MASK_EDGE_PX
from conftest import smooth_random_map


def _coloured(rng, n: int, M: int, power_of_k) -> np.ndarray:
    """n (M, M) images of stationary Gaussian noise with power ``power_of_k(|k|)`` per Fourier sample (|k| in
    Fourier pixels of the M grid; white noise of unit variance has 1 everywhere)."""
    k = np.fft.fftfreq(M) * M
    amplitude = np.sqrt(power_of_k(np.hypot(k[None, :], k[:, None])))
    return np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, M, M))) * amplitude).real


def _with_particle(rng, images, ou):
    """A strong object inside radius ou - 2 on every image: what the estimate must not see."""
    M = images.shape[-1]
    c = np.arange(M) - M // 2
    r = np.hypot(c[None, :], c[:, None])
    blob = np.where(r < ou - 2, 20.0 * np.cos(r / 3.0), 0.0)
    return images + blob * rng.uniform(0.5, 1.5, (len(images), 1, 1))


def test_white_noise_gives_a_flat_spectrum(rng):
    """White noise (with a particle inside the mask ten times the noise): every ring within 10 % of 1."""
    M, ou = 64, 24
    images = _with_particle(rng, rng.standard_normal((400, M, M)) * 3.0, ou)
    spectrum = noise.background_spectrum(images, ou, MASK_EDGE_PX)
    assert spectrum.shape == (M // 2 + 1,)
    assert np.isclose(spectrum[1:].mean(), 1.0)
    np.testing.assert_allclose(spectrum[1:], 1.0, atol=0.1)


def test_coloured_noise_recovers_its_shape(rng):
    """Noise falling 10x from low to high frequency, as micrographs' (bench/coloured_noise_dataset.py's shape):
    the estimate follows the true power per ring (both divided by their mean over rings 1..M/2) within 15 % from
    ring 2 on (the mask's transform blurs the estimate by about a ring)."""
    M, ou = 64, 20

    def power(k):
        return 1.0 + 9.0 / (1.0 + (k / (0.1 * M)) ** 2)

    images = _with_particle(rng, _coloured(rng, 500, M, power), ou)
    spectrum = noise.background_spectrum(images, ou, MASK_EDGE_PX)
    truth = power(np.arange(M // 2 + 1).astype(float))
    truth /= truth[1:].mean()
    assert spectrum[2] > 4 * spectrum[-1]                      # it falls, as the noise does
    np.testing.assert_allclose(spectrum[2:], truth[2:], rtol=0.15)


def test_spectrum_ignores_each_image_level(rng):
    """Images of one noise shape at levels 1x to 100x: the shape is the same as at one level (each image is
    normalised by its own background variance before the sum)."""
    M, ou = 48, 18
    images = _coloured(rng, 300, M, lambda k: 1.0 + 4.0 / (1.0 + (k / 5.0) ** 2))
    levels = rng.uniform(1.0, 100.0, (len(images), 1, 1))
    np.testing.assert_allclose(noise.background_spectrum(images * levels, ou, MASK_EDGE_PX),
                               noise.background_spectrum(images, ou, MASK_EDGE_PX), rtol=1e-10)


def test_bad_input_is_refused(rng):
    M = 32
    with pytest.raises(ValueError, match="background pixels"):
        noise.background_spectrum(rng.standard_normal((4, M, M)), M // 2 - 1, MASK_EDGE_PX + 4)
    with pytest.raises(ValueError, match="no image has any variance"):
        noise.background_spectrum(np.ones((3, M, M)), 10, MASK_EDGE_PX)
    with pytest.raises(ValueError, match=r"\(n, M, M\)"):
        noise.background_spectrum(np.zeros((0, M, M)), 10, MASK_EDGE_PX)
    with pytest.raises(ValueError, match="positive finite"):
        noise.whitening_weights(np.array([1.0, 0.0, 1.0]), np.zeros((1, 2)), 64, 32)


def test_a_ring_of_no_noise_gets_a_bounded_weight(rng):
    """Noise the microscope filtered to nothing beyond ring 14: those rings are floored at POWER_FLOOR of the
    median ring (so their weights are at most 1 / sqrt(POWER_FLOOR) times a typical ring's), the others kept."""
    M, ou = 48, 16
    images = _coloured(rng, 200, M, lambda k: np.where(k < 14, 1.0, 1e-8))
    spectrum = noise.background_spectrum(images, ou, MASK_EDGE_PX)
    median = np.median(spectrum[1:])
    assert spectrum[-1] == pytest.approx(noise.POWER_FLOOR * median)
    assert np.all(spectrum >= noise.POWER_FLOOR * median * (1 - 1e-12))
    assert np.all(spectrum[2:12] > 0.5 * median)


def test_whitening_weights_interpolate_between_rings():
    """At a ring's radius the weight is 1 / sqrt(its power); halfway between rings, of the mean power; beyond the
    last ring, the last ring's. freqs are in padded-grid units (N = 2 M: twice the M grid's Fourier pixels)."""
    spectrum = np.array([4.0, 4.0, 1.0, 0.25])
    M, N = 6, 12
    freqs = np.array([[2.0, 0.0], [0.0, 4.0], [3.0, 0.0], [0.0, 6.0], [6.0, 8.0]])     # rings 1, 2, 1.5, 3, 5
    np.testing.assert_allclose(noise.whitening_weights(spectrum, freqs, N, M),
                               1 / np.sqrt([4.0, 1.0, 2.5, 0.25, 0.25]))


def test_subset_rows_are_spread_over_the_stack():
    np.testing.assert_array_equal(noise.subset_rows(5, most=10), np.arange(5))
    rows = noise.subset_rows(100_000, most=1000)
    assert len(rows) == 1000 and rows[0] == 0 and rows[-1] == 99_999 and np.all(np.diff(rows) > 0)


@pytest.mark.parametrize("with_ctf", [True, False])
def test_prepared_images_whitened(rng, with_ctf):
    """whiten multiplies the data and the CTF by the weights (the weights are the CTF where there is none) and
    power is the whitened data's; with a flat spectrum the scores are the plain objective's."""
    from gpu_ali3d.ctf import CTFParams

    M, n = 32, 5
    vol = smooth_random_map(rng, M)
    ref = gridding.prepare_reference(vol)
    poses = np.column_stack([rng.uniform(0, 360, n), rng.uniform(0, 180, n), rng.uniform(0, 360, n),
                             rng.uniform(-2, 2, (n, 2))])
    ctf = CTFParams(defocus_u_A=rng.uniform(8000, 20000, n), defocus_v_A=rng.uniform(8000, 20000, n),
                    astig_angle_deg=rng.uniform(0, 180, n), voltage_kV=300.0, cs_mm=2.7,
                    amp_contrast=0.1, bfactor_A2=0.0) if with_ctf else None
    images = gridding.project_reference(ref, poses, ctf=ctf, apix_A=4.0) + rng.standard_normal((n, M, M))
    spectrum = 1.0 + 3.0 / (1.0 + (np.arange(M // 2 + 1) / 4.0) ** 2)
    common = dict(ctf=ctf, apix_A=4.0, kmax=0.4 * ref.N, image_pad=1)
    plain = score.prepare_images(images, 13, **common)
    white = score.prepare_images(images, 13, whiten=spectrum, **common)
    w = noise.whitening_weights(spectrum, plain.freqs, plain.N, M)
    np.testing.assert_array_equal(white.freqs, plain.freqs)
    np.testing.assert_allclose(white.data, plain.data * w, rtol=1e-14)
    np.testing.assert_allclose(white.ctf, (np.ones((n, 1)) if ctf is None else plain.ctf) * w, rtol=1e-14)
    np.testing.assert_allclose(white.power, (plain.weights * np.abs(plain.data * w) ** 2).sum(axis=1), rtol=1e-12)
    flat = score.prepare_images(images, 13, whiten=np.full(M // 2 + 1, 2.5), **common)
    np.testing.assert_allclose(score.score(ref, flat, poses), score.score(ref, plain, poses), rtol=1e-12)
    assert not np.allclose(score.score(ref, white, poses), score.score(ref, plain, poses), rtol=1e-3)


def test_whitened_objective_finds_shifts_better_in_coloured_noise(backend, rng):
    """The point of whitening: in noise concentrated at low frequency (100x the power at k = 0 as at Nyquist), the
    whitened correlation's peak over a grid of shifts lies nearer the true shift than the plain one's (mean
    distance over 200 images; 14-24 % nearer on four seeds tried, ad hoc; both objectives see the same images, the same
    reference and the same grid, scored by the backend's kernel)."""
    M, n = 32, 200
    ref = gridding.prepare_reference(smooth_random_map(rng, M))
    poses = np.column_stack([rng.uniform(0, 360, n), rng.uniform(0, 180, n), rng.uniform(0, 360, n),
                             np.zeros((n, 2))])
    clean = gridding.project_reference(ref, poses, apix_A=4.0)
    images = clean + _coloured(rng, n, M, lambda k: 0.05 + 5.0 / (1.0 + (k / 2.0) ** 2)) * clean.std() * 8.0
    spectrum = noise.background_spectrum(images, 12, MASK_EDGE_PX)
    grid = np.arange(-1.5, 1.51, 0.25)
    sx, sy = (a.ravel() for a in np.meshgrid(grid, grid))
    trial = np.repeat(poses, len(sx), axis=0)
    trial[:, 3], trial[:, 4] = np.tile(sx, n), np.tile(sy, n)
    xp = backend.xp
    points = xp.ascontiguousarray(xp.asarray(trial))
    owner = xp.asarray(np.repeat(np.arange(n), len(sx)).astype(np.int64))
    errors = {}
    for name, whiten in (("plain", None), ("whitened", spectrum)):
        prep = score.prepare_images(images, 12, kmax=0.8 * M, image_pad=1, whiten=whiten)
        values = backend.to_host(score.make_objective(ref, prep, backend=backend)(points, owner)).reshape(n, -1)
        best = values.argmax(axis=1)
        errors[name] = float(np.mean(np.hypot(sx[best], sy[best])))
    assert errors["whitened"] < 0.9 * errors["plain"], errors


def test_refine_whitened_writes_its_spectrum(tmp_path, shared_data):
    """--objective whitened through refine (CPU backend, 1 iteration on 60 noisy RELION particles): the start
    line names it, noise_spectrum.txt holds rings 0..M/2 of a white-noise set's nearly flat spectrum, the poses
    differ from the plain objective's run, and job.json records the objective."""
    from gpu_ali3d.io.formats import read_stack
    from gpu_ali3d.refine import local_ali3d

    source = shared_data / "relion_sim" / "noisy" / "start.star"
    box = read_stack(source).box
    runs = {}
    for objective in ("plain", "whitened"):
        runs[objective] = local_ali3d(str(source), tmp_path / objective, CTF=True, maxit=1, objective=objective,
                                      device="cpu", progress=False)
    assert "objective whitened" in (tmp_path / "whitened" / "log.txt").read_text()
    table = np.loadtxt(tmp_path / "whitened" / "noise_spectrum.txt")
    assert table.shape == (box // 2 + 1, 3)
    np.testing.assert_array_equal(table[:, 0], np.arange(box // 2 + 1))
    np.testing.assert_allclose(table[1:, 2], 1.0, atol=0.25)       # white noise
    assert not (tmp_path / "plain" / "noise_spectrum.txt").exists()
    assert not np.array_equal(runs["plain"].poses, runs["whitened"].poses)
    job = json.loads((tmp_path / "whitened" / "job.json").read_text())
    assert job["options"]["objective"] == "whitened"


def test_a_job_from_before_the_option_continues_plain():
    """A job.json without 'objective' (written before the option existed) continues with the plain correlation, as
    it began; one with it keeps it."""
    from gpu_ali3d.refine import job_options

    assert job_options({"options": {"maxit": 3}}).objective == "plain"
    assert job_options({"options": {"maxit": 3, "objective": "whitened"}}).objective == "whitened"


def test_auto_whitens_where_the_box_leaves_background():
    """The default objective (auto) is whitened where the background beyond the mask and its edge has at least
    noise.MIN_BACKGROUND_PIXELS pixels, and plain, saying why, where it has fewer; an explicit choice stays."""
    from gpu_ali3d.options import RefineOptions
    from gpu_ali3d.refine import alignment_objective

    assert RefineOptions().objective == "auto"
    assert alignment_objective(RefineOptions(), 64, 30) == ("whitened", "whitened (auto)")
    few = noise.background_pixels(16, 6, MASK_EDGE_PX)
    assert 0 < few < noise.MIN_BACKGROUND_PIXELS
    chosen, words = alignment_objective(RefineOptions(), 16, 6)
    assert chosen == "plain" and f"leaves {few} background pixels" in words
    assert alignment_objective(RefineOptions(objective="plain"), 64, 30) == ("plain", "plain")
    assert alignment_objective(RefineOptions(objective="whitened"), 16, 6)[0] == "whitened"
    # auto's count is the estimate's own: background_spectrum refuses the box auto aligns plain on, and takes the
    # smallest one auto whitens on
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match=f"leaves {few} background pixels"):
        noise.background_spectrum(rng.normal(size=(4, 16, 16)), 6, MASK_EDGE_PX)
    ou = max(r for r in range(1, 8) if noise.background_pixels(16, r, MASK_EDGE_PX) >= noise.MIN_BACKGROUND_PIXELS)
    assert alignment_objective(RefineOptions(), 16, ou)[0] == "whitened"
    assert np.isfinite(noise.background_spectrum(rng.normal(size=(4, 16, 16)), ou, MASK_EDGE_PX)).all()


def test_a_run_with_the_default_says_and_writes_its_spectrum(tmp_path, capsys):
    """A refinement with the default objective on a box with room for the background whitens: the start line says
    so and the run writes noise_spectrum.txt; job.json keeps 'auto', which a resume resolves the same way."""
    from gpu_ali3d.refine import local_ali3d
    from gpu_ali3d.io.formats import write_stack
    from gpu_ali3d.simulate import phantom, simulate

    stack, _ = simulate(phantom(32), 40, apix_A=3.0, snr=1.0, angle_error_deg=2.0, shift_error_px=0.5, ctf=True,
                        rng=np.random.default_rng(5))
    write_stack(stack, tmp_path / "sim.star")
    local_ali3d(str(tmp_path / "sim.star"), tmp_path / "out", CTF=True, maxit=1, device="cpu", progress=False)
    assert "objective whitened (auto)" in capsys.readouterr().out
    assert (tmp_path / "out" / "noise_spectrum.txt").is_file()
    assert json.loads((tmp_path / "out" / "job.json").read_text())["options"]["objective"] == "auto"


def test_objective_option_is_checked():
    from gpu_ali3d.options import RefineOptions

    with pytest.raises(ValueError, match="--objective 'ml'.*plain, whitened"):
        RefineOptions(objective="ml")


def test_gpu_path_whitens_on_the_device(tmp_path):
    """--objective whitened on the strict CuPy stand-in (the GPU host path): no host/device mixing, the alignment's
    syncs per batch within the plain run's budget (test_gpu_budget.SYNCS_PER_BATCH), and the poses of the CPU
    backend's run (the same kernels and order, so the same to the last bit)."""
    from gpu_ali3d.io.formats import write_stack
    from gpu_ali3d.refine import local_ali3d
    from gpu_ali3d.simulate import phantom, simulate
    from gpu_ali3d.standin import profile_local_ali3d
    from test_gpu_budget import SYNCS_PER_BATCH

    stack, _ = simulate(phantom(32), 80, apix_A=4.0, snr=1.0, angle_error_deg=4.0, shift_error_px=1.5, ctf=True,
                        rng=np.random.default_rng(8))
    write_stack(stack, tmp_path / "sim.star")
    options = dict(maxit=2, CTF=True, objective="whitened", ou=12)
    gpu = profile_local_ali3d(str(tmp_path / "sim.star"), tmp_path / "gpu", **options)
    cpu = local_ali3d(str(tmp_path / "sim.star"), tmp_path / "cpu", device="cpu", progress=False, **options)
    assert sum(c.mixing_errors for c in gpu.iterations) == 0
    for counts, batches in zip(gpu.alignments, gpu.batches):
        assert counts.syncs <= SYNCS_PER_BATCH * batches, counts.summary(6)
    np.testing.assert_array_equal(gpu.result.poses, cpu.poses)
    assert (tmp_path / "gpu" / "noise_spectrum.txt").read_text() == (tmp_path / "cpu" / "noise_spectrum.txt").read_text()


def test_streamed_images_are_read_block_by_block(shared_data):
    """refine's estimate reads the stack's subset as StreamedImages, BLOCK images per read: the spectrum of the
    images in memory, and no read of more than a block."""
    from gpu_ali3d.io.formats import read_stack
    from gpu_ali3d.io.stack import StreamedImages

    stack = read_stack(shared_data / "relion_sim" / "noisy" / "start.star")
    rows = noise.subset_rows(len(stack), most=150)
    source, reads = stack.images, []
    real_read = source.read

    def counted(indices):
        reads.append(len(indices))
        return real_read(indices)

    source.read = counted
    streamed = noise.background_spectrum(StreamedImages(source, rows), 30, MASK_EDGE_PX)
    source.read = real_read
    np.testing.assert_array_equal(streamed, noise.background_spectrum(stack.read_images(rows), 30, MASK_EDGE_PX))
    assert max(reads) <= noise.BLOCK and sum(reads) == len(rows), reads
