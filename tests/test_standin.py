"""The strict CuPy stand-in (gpu_ali3d.standin): its refusals and counts, then real GPU host code run through it.

Each rule is checked by the exact amount a counter moves. The project pieces (score kernel, insertion, batched
simplex, the whole driver with device="gpu") must give the CPU backend's / numpy's answer bit for bit, with no
mixing; their counts are printed (pytest -s) so that a change shows what it would cost on a GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpu_ali3d import gridding, kernels, parallel, score
from gpu_ali3d import reconstruct as rec
from gpu_ali3d.backend import make_backend, make_standin_backend
from gpu_ali3d.ctf import CTFParams
from gpu_ali3d.simplex import SPARX_SERIAL, amoeba_batched
from gpu_ali3d.standin import Counts, RawModule, make_standin


def _moved(xp, action) -> Counts:
    """What ``action()`` added to xp's counts."""
    before = xp.counts.snapshot()
    action()
    return xp.counts - before


def _refused(xp, action, error=TypeError, match=None):
    before = xp.counts.mixing_errors
    with pytest.raises(error, match=match):
        action()
    assert xp.counts.mixing_errors == before + 1


# --- the boundary: refusals ---------------------------------------------------------------------------------------

def test_implicit_conversion_to_numpy_is_refused(standin):
    xp = standin
    d = xp.asarray(np.arange(4.0))
    _refused(xp, lambda: np.asarray(d), match="Implicit conversion")
    _refused(xp, lambda: np.array(d), match="Implicit conversion")
    _refused(xp, lambda: np.array([d, d]), match="Implicit conversion")


@pytest.mark.parametrize("operand", [np.ones(4), np.ones(()), [1.0, 2.0, 3.0, 4.0]], ids=["array", "0-d", "list"])
def test_numpy_and_list_operands_are_refused(standin, operand):
    xp = standin
    d = xp.asarray(np.arange(4.0))
    _refused(xp, lambda: d + operand)
    _refused(xp, lambda: d * operand)
    _refused(xp, lambda: xp.where(d > 1, operand, 0.0))
    _refused(xp, lambda: xp.maximum(d, operand))

    def inplace():
        e = d.copy()
        e += operand
    _refused(xp, inplace)


def test_numpy_array_on_the_left_is_refused(standin):
    xp = standin
    d = xp.asarray(np.arange(4.0))
    _refused(xp, lambda: np.ones(4) + d)
    _refused(xp, lambda: np.ones(4) < d)
    _refused(xp, lambda: np.add(np.ones(4), d))


def test_joins_indices_and_assignments_refuse_host_arrays(standin):
    xp = standin
    d = xp.asarray(np.arange(6.0))
    _refused(xp, lambda: xp.concatenate([d, np.ones(2)]))
    _refused(xp, lambda: xp.stack([d, np.ones(6)]))
    _refused(xp, lambda: d[np.array([0, 2])])

    def assign():
        d[:2] = np.ones(2)          # CuPy would copy implicitly; the stand-in wants an explicit xp.asarray
    _refused(xp, assign)


def test_python_and_numpy_scalars_are_allowed(standin):
    xp = standin
    d = xp.asarray(np.arange(4.0))
    moved = _moved(xp, lambda: [d + 1, 2.0 * d, d * np.float64(0.5), np.float32(3) - d, d ** np.int32(2),
                                xp.where(d > 1, d, 0.0), xp.clip(d, 1, np.float64(2))])
    assert moved.mixing_errors == 0 and moved.syncs == 0 and moved.h2d_bytes == 0
    out = (d * np.float64(2.0)) + np.int64(1)
    assert isinstance(out, xp.ndarray) and out.dtype == np.float64
    np.testing.assert_array_equal(xp.asnumpy(out), np.arange(4.0) * 2 + 1)


def test_results_are_device_arrays_even_where_numpy_gives_scalars(standin):
    xp = standin
    d = xp.asarray(np.arange(6.0).reshape(2, 3))
    for r in (d.sum(), d[0, 1], xp.max(d), np.mean(d), np.sqrt(d), np.concatenate([d, d])):
        assert isinstance(r, xp.ndarray)
    assert d.sum().shape == () and d[1].shape == (3,)


def test_arrays_of_another_device_are_refused(standin):
    xp = make_standin(n_devices=2)
    d0 = xp.asarray(np.arange(3.0))
    xp.cuda.Device(1).use()
    _refused(xp, lambda: d0 + 1.0, ValueError, match="current device")
    d1 = xp.asarray(np.arange(3.0))
    assert d1.device.id == 1 and d0.device.id == 0
    with xp.cuda.Device(0):
        assert float((d0 * 2.0).sum()) == 6.0
    assert xp.cuda.runtime.getDevice() == 1
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        xp.cuda.Device(2).use()


# --- the counts ----------------------------------------------------------------------------------------------------

def test_host_to_device_bytes(standin):
    xp = standin
    host = np.arange(10.0)
    assert _moved(xp, lambda: xp.asarray(host)).as_dict() == Counts(h2d_bytes=80, h2d_copies=1).as_dict()
    assert _moved(xp, lambda: xp.asarray(host, dtype=np.complex64)).h2d_bytes == 80
    d = xp.asarray(host)
    moved = _moved(xp, lambda: xp.asarray(d))                      # already on the device: nothing
    assert moved.as_dict() == Counts().as_dict()
    assert _moved(xp, lambda: xp.asarray(d, dtype=np.float32)).launches == 1      # a cast on the device


@pytest.mark.parametrize("read, nbytes", [
    (lambda xp, d: float(d[0]), 8), (lambda xp, d: int(d[1]), 8), (lambda xp, d: bool(d[2]), 8),
    (lambda xp, d: d[3].item(), 8), (lambda xp, d: d.tolist(), 32), (lambda xp, d: d.get(), 32),
    (lambda xp, d: xp.asnumpy(d), 32)], ids=["float", "int", "bool", "item", "tolist", "get", "asnumpy"])
def test_each_read_back_is_one_sync(standin, read, nbytes):
    xp = standin
    d = xp.asarray(np.arange(4.0))
    moved = _moved(xp, lambda: read(xp, d))
    assert (moved.syncs, moved.d2h_bytes, moved.d2h_copies, moved.launches) == (1, nbytes, 1, 0)


def test_iteration_is_one_sync_per_loop(standin):
    xp = standin
    d = xp.asarray(np.arange(4.0))
    moved = _moved(xp, lambda: [v.shape for v in d])
    assert moved.syncs == 1 and moved.launches == 0


@pytest.mark.parametrize("op, launches, syncs", [
    (lambda xp, d, m: d + 1.0, 1, 0),
    (lambda xp, d, m: xp.sqrt(d), 1, 0),
    (lambda xp, d, m: d.sum(axis=0), 1, 0),
    (lambda xp, d, m: xp.all(m), 1, 0),
    (lambda xp, d, m: d[1:3], 0, 0),                           # basic slicing: a view
    (lambda xp, d, m: d.reshape(2, 4), 0, 0),                  # contiguous reshape: a view
    (lambda xp, d, m: xp.broadcast_to(d, (3, 8)), 0, 0),
    (lambda xp, d, m: xp.empty(5), 0, 0),
    (lambda xp, d, m: xp.zeros(5), 1, 0),
    (lambda xp, d, m: xp.arange(5), 1, 0),
    (lambda xp, d, m: d.copy(), 1, 0),
    (lambda xp, d, m: d.astype(np.float32), 1, 0),
    (lambda xp, d, m: d[xp.arange(3)], 2, 0),                  # arange + gather
    (lambda xp, d, m: xp.concatenate([d, d]), 1, 0),
    (lambda xp, d, m: xp.fft.rfft(d), 1, 0),
    (lambda xp, d, m: d[m], 1, 1),                             # boolean mask: the output size must come back
    (lambda xp, d, m: xp.nonzero(m), 1, 1),
    (lambda xp, d, m: xp.flatnonzero(m), 1, 1),
    (lambda xp, d, m: d.__setitem__(m, 0.0), 1, 1),
    (lambda xp, d, m: d.__setitem__(slice(None), 0.0), 1, 0),
    (lambda xp, d, m: xp.bincount(xp.arange(4)), 2, 2),        # CuPy reads min and max back
], ids=["elementwise", "ufunc", "reduction", "all", "slice", "reshape", "broadcast", "empty", "zeros", "arange",
        "copy", "astype", "gather", "concatenate", "fft", "mask", "nonzero", "flatnonzero", "mask-assign",
        "fill", "bincount"])
def test_launches_and_syncs_per_operation(standin, op, launches, syncs):
    xp = standin
    d = xp.asarray(np.arange(8.0))
    m = xp.asarray(np.arange(8) % 3 == 0)
    moved = _moved(xp, lambda: op(xp, d, m))
    assert (moved.launches, moved.syncs, moved.h2d_bytes, moved.mixing_errors) == (launches, syncs, 0, 0)


def test_counts_snapshot_difference_reset_and_sites(standin):
    xp = standin
    d = xp.asarray(np.arange(4.0))
    snap = xp.counts.snapshot()
    float(d.sum())
    diff = xp.counts - snap
    assert (diff.syncs, diff.launches) == (1, 1) and (snap.syncs, snap.launches) == (0, 0)
    (site, n), = diff.top("sync")
    assert site.startswith("tests/test_standin.py:") and n == 1
    xp.counts.reset()
    assert xp.counts.as_dict() == Counts().as_dict() and not xp.counts.sites["sync"]


def test_fft_matches_the_host_fft_and_keeps_single_precision(standin, rng):
    import scipy.fft

    xp = standin
    img = rng.standard_normal((3, 8, 8)).astype(np.float32)
    d = xp.asarray(img)
    moved = _moved(xp, lambda: xp.fft.irfft2(xp.fft.rfft2(d), s=(8, 8)))
    assert moved.launches == 2
    f = xp.fft.rfft2(d)
    assert f.dtype == np.complex64
    np.testing.assert_array_equal(xp.asnumpy(f), scipy.fft.rfft2(img))        # the CPU backend's FFT, bit for bit
    np.testing.assert_array_equal(xp.asnumpy(xp.fft.fftfreq(8)), np.fft.fftfreq(8))


# --- devices and the backend -----------------------------------------------------------------------------------------

class _Comm:
    def __init__(self, local):
        self._local = local

    def local_rank(self):
        return self._local


def test_select_device_uses_the_node_local_rank():
    xp = make_standin(n_devices=2)
    backend = make_standin_backend(xp)
    assert backend.name == "gpu" and backend.counts is xp.counts
    assert parallel.select_device(backend, _Comm(3)) == 1
    assert xp.devices_used == [1] and xp.current_device == 1
    assert make_backend("cpu").counts is None


def test_free_memory_follows_the_live_arrays(standin_backend):
    xp = standin_backend.xp
    free = standin_backend.free_memory_bytes()
    big = xp.zeros((1 << 20,))
    assert standin_backend.free_memory_bytes() == free - big.nbytes
    del big
    assert standin_backend.free_memory_bytes() == free


def test_kernel_modules_get_the_gpu_source_and_options(standin_backend):
    standin_backend.kernels.load("score")
    module = standin_backend.kernels.module("score")
    assert module.code == kernels.kernel_source("score")
    assert module.options == kernels.nvrtc_options("score") == kernels.NVRTC_OPTIONS_FAST


def test_raw_kernels_refuse_host_arrays_python_scalars_and_bad_blocks(standin):
    xp = standin
    fn = RawModule(xp, kernels.kernel_source("insert"), kernels.NVRTC_OPTIONS).get_function("insert_unscale")
    d = xp.zeros(4)
    _refused(xp, lambda: fn((1,), (128,), (d, np.zeros(4), np.int32(2), d, d, d, d)), match="numpy array")
    _refused(xp, lambda: fn((1,), (128,), (d, d, 2, d, d, d, d)), match="numpy scalars")
    with pytest.raises(ValueError, match="multiple of 32"):
        fn((1,), (100,), (d, d, np.int32(2), d, d, d, d))
    with pytest.raises(RuntimeError, match="not found"):
        RawModule(xp, kernels.kernel_source("insert")).get_function("no_such_kernel")
    assert xp.counts.launches == 1 and not xp.counts.kernels          # the zeros only; nothing ran


# --- real project pieces through the stand-in ----------------------------------------------------------------------

def _score_problem(rng, m=24, n_img=8, n_pairs=120):
    from gpu_ali3d.simulate import phantom
    ref = gridding.prepare_reference(phantom(m, rng), interpolation="kb")
    true = np.column_stack([rng.uniform(0, 360, n_img), rng.uniform(0, 180, n_img), rng.uniform(0, 360, n_img),
                            rng.uniform(-2, 2, (n_img, 2))])
    ctf = CTFParams(rng.uniform(8000, 20000, n_img), rng.uniform(8000, 20000, n_img), rng.uniform(0, 180, n_img),
                    300.0, 2.7, 0.1, 0.0)
    images = gridding.project_reference(ref, true, ctf=ctf, apix_A=3.0)
    images += rng.standard_normal(images.shape) * images.std()
    prep = score.prepare_images(images, ou=m // 2 - 2, ctf=ctf, apix_A=3.0, kmax=ref.N / 4, image_pad=1)
    idx = rng.integers(0, n_img, n_pairs)
    poses = true[idx] + rng.normal(0, 3, (n_pairs, 5))
    return ref, prep, poses, idx


def test_score_kernel_on_the_standin_equals_the_cpu_backend(standin_backend, rng):
    xp = standin_backend.xp
    ref, prep, poses, idx = _score_problem(rng)
    want = kernels.score_kernel(make_backend("cpu"), ref, prep, poses, idx)
    convert = _moved(xp, lambda: None)
    kref = kernels.kernel_reference(standin_backend, ref, kmax=prep.kmax)
    kimg = kernels.kernel_images(standin_backend, prep)
    convert = xp.counts - convert
    p, i = xp.asarray(poses), xp.asarray(idx)
    checked = _moved(xp, lambda: kernels.score_sums(standin_backend, kref, kimg, p, i))
    unchecked = _moved(xp, lambda: kernels.score_sums(standin_backend, kref, kimg, p, i, check_index=False))
    got = {}
    full = _moved(xp, lambda: got.setdefault("s", kernels.score_kernel(standin_backend, kref, kimg, p, i,
                                                                        check_index=False)))
    np.testing.assert_array_equal(standin_backend.to_host(got["s"]), want)
    print(f"\nconvert (per batch): {convert.summary()}\nscore_sums: {checked.summary()}\n"
          f"score_sums(check_index=False): {unchecked.summary()}\nscore_kernel: {full.summary()}")
    assert xp.counts.mixing_errors == 0
    assert convert.syncs == 0 and convert.launches == 0
    assert (unchecked.launches, unchecked.syncs) == (1, 0) and unchecked.kernels == {"score_kb": 1}
    assert checked.syncs == 2                     # the index range check reads min and max back
    assert full.syncs == 0 and full.kernels == {"score_kb": 1}


@pytest.mark.parametrize("sym, with_ctf", [("c1", True), ("d2", False)])
def test_insert_on_the_standin_equals_the_cpu_backend(standin_backend, rng, sym, with_ctf):
    xp = standin_backend.xp
    m, n = 24, 16
    images = rng.normal(size=(n, m, m)).astype(np.float32)
    poses = np.column_stack([rng.uniform(0, 360, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                             rng.uniform(0, 360, n), rng.uniform(-3, 3, (n, 2))])
    ctf = CTFParams(rng.uniform(6000, 20000, n), rng.uniform(6000, 20000, n), rng.uniform(0, 180, n), 300.0, 2.7,
                    0.1, 0.0) if with_ctf else None
    want = rec.new_accumulator(m, sym=sym)
    rec.insert(want, images, poses, ctf=ctf, apix_A=2.5, backend=make_backend("cpu"))

    got = rec.new_accumulator(m, sym=sym)
    got.data, got.weights = xp.zeros(got.data.shape, np.complex128), xp.zeros(got.weights.shape)
    moved = _moved(xp, lambda: rec.insert(got, images, poses, ctf=ctf, apix_A=2.5, backend=standin_backend))
    np.testing.assert_array_equal(standin_backend.to_host(got.data), want.data)
    np.testing.assert_array_equal(standin_backend.to_host(got.weights), want.weights)
    print(f"\ninsert ({n} images, box {m}, {sym}, CTF {with_ctf}): {moved.summary(6)}")
    assert moved.mixing_errors == 0
    assert moved.kernels == {"insert": 1, "insert_unscale": 1}      # one launch per call, not per image


def test_amoeba_batched_on_the_standin_equals_numpy(standin, rng):
    xp = standin
    n, d = 40, 5
    centre, weight = rng.normal(size=(n, d)), rng.uniform(0.5, 2.0, (n, d))
    x0, scales = centre + rng.normal(0, 1, (n, d)), rng.uniform(0.5, 1.5, (n, d))
    calls = []

    def quadratic(c, w):
        def f(points, owner):
            calls.append(points.shape[0])
            return -(w[owner] * (points - c[owner]) ** 2).sum(axis=1)
        return f

    want = amoeba_batched(quadratic(centre, weight), x0, scales, **SPARX_SERIAL)
    calls.clear()
    c, w, x, s = (xp.asarray(a) for a in (centre, weight, x0, scales))
    got = []
    moved = _moved(xp, lambda: got.extend(amoeba_batched(quadratic(c, w), x, s, xp=xp, **SPARX_SERIAL)))
    for g, ref in zip(got, want):
        np.testing.assert_array_equal(xp.asnumpy(g), ref)
    steps = int(want[2].max())          # lockstep: the batch runs until its slowest problem is done
    objective = sum(v for site, v in moved.sites["launch"].items() if site.endswith(" f"))
    print(f"\namoeba_batched, {n} problems, d = {d}, {steps} steps (mean {want[2].mean():.0f}), "
          f"{len(calls)} objective calls: {moved.launches / steps:.1f} launches and {moved.syncs / steps:.2f} syncs "
          f"per step ({(moved.launches - objective) / steps:.1f} launches of simplex bookkeeping)\n{moved.summary(10)}")
    assert moved.mixing_errors == 0 and moved.h2d_bytes == 0
    # today's lockstep host loop: 9 syncs in a step that shrinks, one more where some problem finishes, and the
    # scale check (issue 15 item 1 moves the whole simplex into the kernel: a handful per batch)
    assert moved.syncs <= 10 * steps + 1


def test_local_ali3d_gpu_path_on_the_standin_equals_the_cpu_run(tmp_path, monkeypatch, capsys):
    import gpu_ali3d.backend
    from gpu_ali3d import local_ali3d
    from gpu_ali3d.io.formats import write_stack
    from gpu_ali3d.simulate import phantom, simulate

    stack, _ = simulate(phantom(24), 30, apix_A=4.0, snr=10.0, angle_error_deg=4.0, shift_error_px=1.5, ctf=True,
                        rng=np.random.default_rng(8))
    write_stack(stack, tmp_path / "sim.star")
    common = dict(maxit=1, CTF=True, interpolation="trilinear", progress=False)
    cpu = local_ali3d(str(tmp_path / "sim.star"), tmp_path / "cpu", device="cpu", **common)

    xp = make_standin()
    real = gpu_ali3d.backend.make_backend
    monkeypatch.setattr(gpu_ali3d.backend, "make_backend",
                        lambda name="auto", **kw: make_standin_backend(xp) if name == "gpu" else real(name, **kw))
    gpu = local_ali3d(str(tmp_path / "sim.star"), tmp_path / "gpu", device="gpu", **common)
    np.testing.assert_array_equal(gpu.poses, cpu.poses)
    with capsys.disabled():
        image_bytes = len(stack) * stack.box ** 2 * 4
        print(f"\nlocal_ali3d --device gpu on the stand-in (30 images, box 24, 1 alignment + 2 reconstructions; "
              f"images {image_bytes} B):\n{xp.counts.summary(8)}\nkernels: {dict(xp.counts.kernels)}\n"
              f"h2d by site: {xp.counts.sites['h2d'].most_common(4)}")
    assert xp.counts.mixing_errors == 0 and xp.devices_used == [0]
    assert xp.counts.kernels["insert"] == 4       # per half set and reconstruction, not per image
