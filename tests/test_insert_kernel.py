"""kernels/insert.cu (reconstruct.insert_transforms_kernel / insert_sums) against the numpy reference
(reconstruct.insert_transforms) on random images, poses, shifts and CTFs: the same voxels, the same sums to the
float32 rounding of the kernel's inputs; the deterministic mode bitwise repeatable; finished maps equal."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpu_ali3d import reconstruct as rec
from gpu_ali3d.backend import make_backend
from gpu_ali3d.ctf import CTFParams

PROJECT = Path(__file__).resolve().parents[1]
APIX_A = 2.5


def _case(rng, m, n, ctf_kind):
    """Random images (float32, as read from disk), uniform-ish poses with shifts, and CTFs (None, one, or n)."""
    images = rng.normal(size=(n, m, m)).astype(np.float32)
    poses = np.column_stack([rng.uniform(0, 360, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                             rng.uniform(0, 360, n), rng.uniform(-4, 4, n), rng.uniform(-4, 4, n)])
    k = {"none": 0, "one": 1, "each": n}[ctf_kind]
    ctf = None if k == 0 else CTFParams(rng.uniform(6000, 20000, k), rng.uniform(6000, 20000, k),
                                        rng.uniform(0, 180, k), 300.0, 2.7, 0.1, 0.0)
    return images, poses, ctf


def _poisoned(m, sym, rng, scale):
    """An accumulator already holding random non-zero data and weights (as after earlier chunks)."""
    acc = rec.new_accumulator(m, sym=sym)
    acc.data = scale * (rng.normal(size=acc.data.shape) + 1j * rng.normal(size=acc.data.shape))
    acc.weights = scale * rng.uniform(0.5, 2.0, size=acc.weights.shape)
    return acc


def _on(backend, acc):
    """A copy of acc whose grids live on the backend."""
    copy = rec.FourierAccumulator(backend.xp.asarray(acc.data.copy()), backend.xp.asarray(acc.weights.copy()),
                                  acc.M, acc.npad, acc.sym, acc.snr, acc.ctf, acc.n_images)
    return copy


CASES = [  # M, n images, sym, CTF (none / one for all / one each), deterministic
    (32, 1, "c1", "each", True),
    (32, 57, "d2", "none", True),
    (33, 40, "c1", "each", False),
    (33, 12, "d2", "one", True),
    (64, 300, "c1", "each", True),
    (64, 20, "d2", "none", False),
    (65, 30, "c1", "each", True),
    (128, 6, "c1", "each", True),
]


@pytest.mark.parametrize("m, n, sym, ctf_kind, deterministic", CASES)
def test_insert_parity(backend, m, n, sym, ctf_kind, deterministic):
    rng = np.random.default_rng(1000 * m + n)
    images, poses, ctf = _case(rng, m, n, ctf_kind)
    transforms, weights = rec.slice_transforms(images, poses, npad=2, ctf=ctf, apix_A=APIX_A)
    has_ctf = ctf is not None
    # Sum of |contribution| per voxel: the scale of each voxel's rounding; and the number of contributions.
    bound, counts = rec.new_accumulator(m, sym=sym), rec.new_accumulator(m, sym=sym)
    rec.insert_transforms(bound, np.abs(transforms).astype(np.complex128), weights, poses, ctf=has_ctf)
    rec.insert_transforms(counts, transforms, None, poses, ctf=False)
    fixed_v, fixed_w = _fixed_point_rounding(transforms, weights, counts.weights, sym) if deterministic else (0, 0)
    # Poisoned start: the kernel must add to what is there, exactly what the reference adds.
    start = _poisoned(m, sym, rng, scale=float(np.abs(transforms).mean()))
    ref, kern = _on(make_backend("cpu"), start), _on(backend, start)
    rec.insert_transforms(ref, transforms, weights, poses, ctf=has_ctf)
    rec.insert_transforms_kernel(kern, transforms, weights, poses, ctf=has_ctf, backend=backend,
                                 deterministic=deterministic)
    data, wsum = backend.to_host(kern.data), backend.to_host(kern.weights)
    assert (kern.ctf, kern.n_images) == (ref.ctf, ref.n_images)

    # Tolerance: the kernel reads the transforms and CTF^2 rounded to float32 (relative error <= 2^-24 = 6e-8 per
    # term, so <= 6e-8 * sum|term| per voxel); its float64 sums add far less, and adding to the poisoned start costs
    # an ulp of |start| (2.2e-16). 1e-6 * sum|term| leaves a 16x margin; a sample put into a wrong voxel would miss
    # it by ~|term|. The deterministic mode adds its fixed-point rounding, <= 0.5 / scale[shell] per contribution
    # (kernels/insert.cu): ~1e-11 of the shell's typical voxel, which only shows beside voxels on a CTF zero.
    for name, got, want, terms, init, fixed in (
            ("data", data, ref.data, bound.data.real, start.data, fixed_v),
            ("weights", wsum, ref.weights, bound.weights, start.weights, fixed_w)):
        allowed = 1e-6 * terms + 4e-16 * np.abs(init) + fixed + 1e-300
        err = np.abs(got - want)
        assert (err <= allowed).all(), f"{name}: worst excess {np.max(err / allowed):.3g} x tolerance"
        added_ref, added = want - init, got - init
        rel = np.linalg.norm(added - added_ref) / np.linalg.norm(added_ref)
        assert rel < 1e-5, f"{name}: relative error {rel:.2e} of what was added"   # the brief's 1e-5 relative
    if deterministic and not has_ctf:
        # Weight 1 per sample is exact in fixed point: the counts, added to the start, equal the reference's.
        assert np.array_equal(wsum, ref.weights)


def test_voxels_identical_to_the_reference(backend):
    """Counts per voxel (no CTF, deterministic mode: exact integers) equal the reference's bit for bit, for c1 and
    d2: the kernel rounds every rotated sample to the same voxel."""
    rng = np.random.default_rng(7)
    images, poses, _ = _case(rng, 32, 64, "none")
    for sym in ("c1", "d2"):
        ref, kern = rec.new_accumulator(32, sym=sym), _on(backend, rec.new_accumulator(32, sym=sym))
        rec.insert(ref, images, poses)
        rec.insert(kern, images, poses, backend=backend)
        assert np.array_equal(backend.to_host(kern.weights), ref.weights)


def test_deterministic_mode_repeats_bitwise(backend):
    """Several runs of the deterministic mode in one process give identical bits (CPU and GPU twins)."""
    rng = np.random.default_rng(3)
    images, poses, ctf = _case(rng, 32, 150, "each")
    digests = set()
    for _ in range(3):
        acc = _on(backend, rec.new_accumulator(32, sym="d2"))
        rec.insert(acc, images, poses, ctf=ctf, apix_A=APIX_A, backend=backend)
        digests.add(_digest(backend.to_host(acc.data), backend.to_host(acc.weights)))
    assert len(digests) == 1


def test_reused_scratch_gives_the_same_bits_and_is_left_zero(backend):
    """Chunks sharing one scratch grid (reconstruct._accumulate) sum to the bits of fresh scratch per call."""
    rng = np.random.default_rng(4)
    images, poses, ctf = _case(rng, 32, 120, "each")
    fresh = _on(backend, rec.new_accumulator(32))
    shared = _on(backend, rec.new_accumulator(32))
    scratch = rec.new_scratch(backend, shared.Np)
    for part in (slice(0, 50), slice(50, 120)):
        rec.insert(fresh, images[part], poses[part], ctf=ctf[part], apix_A=APIX_A, backend=backend)
        rec.insert(shared, images[part], poses[part], ctf=ctf[part], apix_A=APIX_A, backend=backend,
                   scratch=scratch)
        assert not backend.to_host(scratch).any()
    assert _digest(*(backend.to_host(a) for a in (fresh.data, fresh.weights))) == \
        _digest(*(backend.to_host(a) for a in (shared.data, shared.weights)))


_RUN = """
import hashlib, numpy as np
from gpu_ali3d import reconstruct as rec
from gpu_ali3d.backend import make_backend
from gpu_ali3d.ctf import CTFParams
rng = np.random.default_rng(5)
n, m = 300, 32
images = rng.normal(size=(n, m, m)).astype(np.float32)
poses = np.column_stack([rng.uniform(0, 360, n), rng.uniform(0, 180, n), rng.uniform(0, 360, n),
                         rng.uniform(-3, 3, n), rng.uniform(-3, 3, n)])
ctf = CTFParams(rng.uniform(6000, 20000, n), rng.uniform(6000, 20000, n), rng.uniform(0, 180, n), 300, 2.7, 0.1, 0)
acc = rec.new_accumulator(m, sym="d2")
rec.insert(acc, images, poses, ctf=ctf, apix_A=2.5, backend=make_backend("cpu"), deterministic=True)
h = hashlib.sha256(acc.data.tobytes()); h.update(acc.weights.tobytes()); print(h.hexdigest())
"""


def test_deterministic_mode_is_independent_of_threads():
    """CPU build: OMP_NUM_THREADS=2 three times and =1 once (separate processes, as OpenMP reads it at start-up):
    one digest. The sums are exact in fixed point, so the thread count cannot change them."""
    out = set()
    for threads in (2, 2, 2, 1):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, "-c", _RUN], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out.add(proc.stdout.strip())
    assert len(out) == 1, out


@pytest.mark.parametrize("ctf_kind, sym", [("each", "d2"), ("none", "c1")])
def test_finished_maps_equal_the_reference(backend, ctf_kind, sym):
    rng = np.random.default_rng(11)
    images, poses, ctf = _case(rng, 32, 120, ctf_kind)
    want = rec.reconstruct_halves(images, poses, ctf=ctf, apix_A=APIX_A, sym=sym, chunk=50)
    got = rec.reconstruct_halves(images, poses, ctf=ctf, apix_A=APIX_A, sym=sym, chunk=50, backend=backend)
    for a, b in zip(got, want):
        assert isinstance(a, np.ndarray)
        # The maps are linear in the accumulated sums (errors <= 1e-6 relative per voxel, above) divided by the
        # weights (same support: the same voxels are filled), so 1e-5 of the map's range is a safe bound.
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))
    full = rec.reconstruct(images, poses, ctf=ctf, apix_A=APIX_A, sym=sym, backend=backend)
    assert np.max(np.abs(full - want[2])) <= 1e-5 * np.max(np.abs(want[2]))


def test_insert_sums_checks_arguments():
    backend = make_backend("cpu")
    n_p, half = 16, 9
    t = np.zeros((2, n_p, half), np.complex64)
    mates = np.tile(np.eye(3), (2, 1, 1, 1))
    samples = np.flatnonzero(rec._kept_samples(n_p)[0]).astype(np.int32)
    data, wsum = np.zeros((n_p, n_p, half), np.complex128), np.zeros((n_p, n_p, half))
    rec.insert_sums(backend, t, None, mates, samples, data, wsum)                        # fine
    with pytest.raises(TypeError, match="transforms must be complex64"):
        rec.insert_sums(backend, t.astype(np.complex128), None, mates, samples, data, wsum)
    with pytest.raises(TypeError, match="data must be complex128"):
        rec.insert_sums(backend, t, None, mates, samples, data.astype(np.complex64), wsum)
    with pytest.raises(ValueError, match="mates has shape"):
        rec.insert_sums(backend, t, None, mates[:1], samples, data, wsum)
    with pytest.raises(ValueError, match="weights has shape"):
        rec.insert_sums(backend, t, np.zeros((3, n_p, half), np.float32), mates, samples, data, wsum)
    with pytest.raises(ValueError, match="C-contiguous"):
        rec.insert_sums(backend, np.zeros((2, n_p, 2 * half), np.complex64)[:, :, ::2], None, mates, samples,
                        data, wsum)
    with pytest.raises(ValueError, match="samples must index"):
        rec.insert_sums(backend, t, None, mates, np.array([n_p * half], np.int32), data, wsum)
    with pytest.raises(ValueError, match="NaN or infinite"):
        bad = t.copy()
        bad[0, 1, 1] = np.nan
        rec.insert_sums(backend, bad, None, mates, samples, data, wsum)


def _fixed_point_rounding(transforms, weights, counts, sym):
    """Per voxel, the deterministic mode's largest rounding: count * 0.5 / scale[shell] (data, weights)."""
    n_p = counts.shape[0]
    samples = np.flatnonzero(rec._kept_samples(n_p)[0]).astype(np.int32)
    k = len(rec.symmetry_rotations(sym))
    scale_v, scale_w = rec._shell_scales(np, transforms.astype(np.complex64),
                                         None if weights is None else weights.astype(np.float32), samples, n_p, k)
    f = rec._signed(n_p)
    r2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + np.arange(n_p // 2 + 1)[None, None, :] ** 2
    shell = np.floor(np.sqrt(r2)).astype(np.int64)                # r2 < 2^52: exact for these sizes
    # data: re and im each rounded, |error| <= sqrt(2) * 0.5 / scale per contribution
    return counts * np.sqrt(2) * 0.5 / scale_v[shell], counts * 0.5 / scale_w[shell]


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
