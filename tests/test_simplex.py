"""SPARX's amoeba: the scalar reference against known optima and hand-worked steps; the batched path against it."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gpu_ali3d.simplex import SPARX_MPI, SPARX_SERIAL, amoeba_batched, amoeba_scalar, local_ali3d_scales


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    if request.param == "numpy":
        return np
    return pytest.importorskip("cupy")


def _logged(f):
    """f plus the list of points it was called with, in order."""
    log = []

    def g(x):
        log.append(tuple(float(v) for v in x))
        return f(x)
    return g, log


# --- the scalar reference: hand-worked steps on a 2-D simplex (0,0), (1,0), (0,1) -----------------------------

def test_reflection_accepted_then_shrink():
    # f = -(x-1)^2 - (y-0.2)^2; vertices -1.04, -0.04, -1.64: best 1, worst 2, centroid (0.5, 0).
    # step 1: r = (1,-1), f = -1.44, between worst and best -> r replaces vertex 2.
    # step 2: best 1, worst 2 (-1.44 < -1.04), centroid (0.5, 0), r = (0, 1), f = -1.64 <= -1.44 -> shrink:
    #         vertex 0 -> (0.5, 0), new vertex 2 = midpoint of (1,0) and (1,-1) = (1, -0.5).
    f, log = _logged(lambda p: -(p[0] - 1.0) ** 2 - (p[1] - 0.2) ** 2)
    x, fx, it = amoeba_scalar(f, [0.0, 0.0], [1.0, 1.0], itmax=2)
    assert log == [(0, 0), (1, 0), (0, 1), (1, -1), (0, 1), (0.5, 0), (1, -0.5)]
    assert it == 2 and x.tolist() == [1.0, 0.0] and fx == pytest.approx(-0.04, abs=1e-15)


def test_expansion_accepted_twice():
    # f = x + 2y; values 0, 1, 2: best 2, worst 0, centroid (0.5, 0.5); r = (1,1) f = 3 >= 2, e = (1.5,1.5) f = 4.5 > 3.
    # step 2: vertices (1.5,1.5) 4.5, (1,0) 1, (0,1) 2; worst 1, centroid (0.75, 1.25); r = (0.5, 2.5) f = 5.5,
    #         e = (0.25, 3.75) f = 7.75 -> accepted.
    f, log = _logged(lambda p: p[0] + 2.0 * p[1])
    x, fx, it = amoeba_scalar(f, [0.0, 0.0], [1.0, 1.0], itmax=2)
    assert log == [(0, 0), (1, 0), (0, 1), (1, 1), (1.5, 1.5), (0.5, 2.5), (0.25, 3.75)]
    assert (x.tolist(), fx, it) == ([0.25, 3.75], 7.75, 2)


def test_ties_go_to_the_lowest_index_and_a_failed_expansion_keeps_r():
    # f = -(x-1)^2 - (y-1)^2; values -2, -1, -1: best = vertex 1 (first of the tie), worst 0. r = (1,1) f = 0 >= -1,
    # e = (1.5,1.5) f = -0.5 is not > 0, so r is kept. Step 2: values 0, -1, -1: worst = vertex 1 (first of the tie),
    # centroid (0.5, 1), r = (0, 2) f = -2 -> shrink: vertex 2 -> (0.5, 1), midpoint of (1,1) and (1,0) = (1, 0.5).
    f, log = _logged(lambda p: -(p[0] - 1.0) ** 2 - (p[1] - 1.0) ** 2)
    x, fx, it = amoeba_scalar(f, [0.0, 0.0], [1.0, 1.0], itmax=2)
    assert log == [(0, 0), (1, 0), (0, 1), (1, 1), (1.5, 1.5), (0, 2), (0.5, 1), (1, 0.5)]
    assert (x.tolist(), fx, it) == ([1.0, 1.0], 0.0, 2)


def test_reflection_equal_to_worst_shrinks():
    # f = -y^2; values 0, 0, -1: best 0, worst 2, centroid (0.5, 0), r = (1,-1) f = -1 == f_worst -> shrink (<=).
    f, log = _logged(lambda p: -p[1] ** 2)
    amoeba_scalar(f, [0.0, 0.0], [1.0, 1.0], itmax=1)
    assert log == [(0, 0), (1, 0), (0, 1), (1, -1), (0.5, 0), (0, 0.5)]


def test_reflection_equal_to_best_expands():
    # f = x; values 0, 1, 0: best 1, worst 0, centroid (0.5, 0.5), r = (1,1) f = 1 == f_best -> expand (>=),
    # e = (1.5, 1.5) f = 1.5 accepted.
    f, log = _logged(lambda p: p[0])
    x, fx, it = amoeba_scalar(f, [0.0, 0.0], [1.0, 1.0], itmax=1)
    assert log == [(0, 0), (1, 0), (0, 1), (1, 1), (1.5, 1.5)]
    assert (x.tolist(), fx, it) == ([1.5, 1.5], 1.5, 1)


def test_all_equal_values_shrink_every_vertex():
    # f = 0: best = worst = vertex 0; centroid (0.5, 0.5), r = (1,1) f = 0 <= 0 -> shrink vertices 1 and 2 towards
    # vertex 0 and replace vertex 0 by the midpoint of itself and itself.
    f, log = _logged(lambda p: 0.0)
    amoeba_scalar(f, [0.0, 0.0], [1.0, 1.0], itmax=1)
    assert log == [(0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0), (0, 0.5), (0, 0)]


# --- the convergence test -------------------------------------------------------------------------------------

def test_x_test_is_the_mean_scaled_distance_of_the_worst_vertex_from_the_centroid():
    # f = -x: worst = vertex 1 = x0 + (s0, 0); centroid of vertices 0 and 2 = x0 + (0, s1/2);
    # mean(|c - worst| / s) = (1 + 0.5) / 2 = 0.75 whatever the scales; f test off (ftol = 0).
    f = lambda p: -p[0]                                                    # noqa: E731
    x, _, it = amoeba_scalar(f, [3.0, -2.0], [2.0, 4.0], ftol=0.0, xtol=0.7500001, itmax=3)
    assert it == 0 and x.tolist() == [3.0, -2.0]
    _, _, it = amoeba_scalar(f, [3.0, -2.0], [2.0, 4.0], ftol=0.0, xtol=0.75, itmax=3)   # strict <
    assert it == 3


def test_f_test_is_the_range_relative_to_the_mean_magnitude():
    # f = 10 + x: best 11, worst 10, frange = 1 / 10.5; x test off.
    f = lambda p: 10.0 + p[0]                                              # noqa: E731
    assert amoeba_scalar(f, [0.0, 0.0], [1.0, 1.0], ftol=1 / 10.5 + 1e-12, xtol=0.0, itmax=3)[2] == 0
    assert amoeba_scalar(f, [0.0, 0.0], [1.0, 1.0], ftol=1 / 10.5 - 1e-12, xtol=0.0, itmax=3)[2] == 3
    # all values zero: frange is 0, and only the x test (0.5 here: centroid (0.5, 0.5) from worst (0, 0)) decides
    assert amoeba_scalar(lambda p: 0.0, [0.0, 0.0], [1.0, 1.0], xtol=0.51, itmax=3)[2] == 0


def test_both_tests_must_pass_and_itmax_zero_means_no_limit():
    f = lambda p: 2.0 - (p[0] - 0.3) ** 2 - 4.0 * (p[1] + 0.2) ** 2        # noqa: E731
    _, _, it_limited = amoeba_scalar(f, [0.0, 0.0], [1.0, 1.0], ftol=1e-12, xtol=1e-12, itmax=7)
    _, _, it_free = amoeba_scalar(f, [0.0, 0.0], [1.0, 1.0], ftol=1e-12, xtol=1e-12, itmax=0)
    assert it_limited == 7 and it_free > 7


# --- the scalar reference against known optima ----------------------------------------------------------------

def test_concave_quadratic_reaches_its_maximum():
    c = np.array([1.5, -0.7, 3.0])
    a = np.array([1.0, 3.0, 0.5])
    f = lambda p: 5.0 - float(np.sum(a * (p - c) ** 2))                   # noqa: E731
    x, fx, it = amoeba_scalar(f, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], **SPARX_SERIAL)
    assert it < 500
    # the f test allows |f_best - f_worst| < 1e-4 * 5, the x test 1e-4 of the unit scales
    assert fx == pytest.approx(5.0, abs=5e-4)
    np.testing.assert_allclose(x, c, atol=2e-2)


def test_negated_rosenbrock_reaches_its_maximum():
    # 1 - rosenbrock: maximum 1 at (1, 1). (With a maximum of 0 the relative f test could never be met.)
    f = lambda p: 1.0 - (100.0 * (p[1] - p[0] ** 2) ** 2 + (1.0 - p[0]) ** 2)   # noqa: E731
    x, fx, it = amoeba_scalar(f, [-1.2, 1.0], [0.5, 0.5], ftol=1e-12, xtol=1e-9, itmax=5000)
    assert it < 5000
    assert fx == pytest.approx(1.0, abs=1e-10)
    np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-4)


def test_data_and_passout_are_handed_through():
    def f(p, data):
        return -(p[0] - data) ** 2, ("seen at", float(p[0]))
    x, fx, it, extra = amoeba_scalar(f, [0.0], [1.0], data=2.0, passout=True)
    assert extra == ("seen at", float(x[0])) and abs(x[0] - 2.0) < 1e-3


# --- the batched path is the scalar rules, bitwise --------------------------------------------------------------

def _problem_set(rng, n, d):
    """n problems of several kinds (per-problem objectives), start points and scales, as numpy arrays."""
    kind = np.arange(n) % 6
    centre = rng.normal(0.0, 2.0, (n, d))
    weight = rng.uniform(0.3, 3.0, (n, d))
    x0 = rng.normal(0.0, 1.0, (n, d))
    x0[kind == 3] = 1.0e17          # x0 + scale == x0: a degenerate simplex, converged before the first step
    scales = rng.uniform(0.2, 2.0, (n, d))
    scales[kind == 3] = 1.0
    return dict(kind=kind, centre=centre, weight=weight), x0, scales


def _objective(params, xp):
    """f_batch over several kinds of problem, each point computed on its own row (bitwise independent of m)."""
    kind = xp.asarray(params["kind"])
    centre = xp.asarray(params["centre"])
    weight = xp.asarray(params["weight"])

    def quadratic(p, o):
        s = xp.zeros(p.shape[0])
        for j in range(p.shape[1]):
            t = p[:, j] - centre[o, j]
            s = s + weight[o, j] * (t * t)
        return 3.0 - s

    def rosenbrock(p, o):       # 1 - rosenbrock around the centre: a long curved valley
        q = p - centre[o]
        s = xp.zeros(p.shape[0])
        for j in range(p.shape[1] - 1):
            a = q[:, j + 1] - q[:, j] * q[:, j]
            b = 1.0 - q[:, j]
            s = s + 100.0 * (a * a) + b * b
        return 1.0 - s

    def linear(p, o):           # unbounded: keeps expanding until itmax
        s = xp.zeros(p.shape[0])
        for j in range(p.shape[1]):
            s = s + weight[o, j] * p[:, j]
        return s

    def zero(p, o):
        return xp.zeros(p.shape[0])

    def with_nan(p, o):         # NaN on one side of the centre: a NaN vertex 0 can keep the f test from passing
        v = quadratic(p, o)
        return xp.where(p[:, 0] > centre[o, 0] + 0.5, xp.nan, v)

    def plateau(p, o):          # flat top: many equal values, all-equal shrinks
        v = quadratic(p, o) - 3.0 + 1.5
        return xp.where(v > 0.0, 0.0, v)

    kinds = [quadratic, rosenbrock, linear, zero, with_nan, plateau]

    def f_batch(points, owner):
        out = xp.empty(points.shape[0])
        k = kind[owner]
        for i, fk in enumerate(kinds):
            sel = xp.nonzero(k == i)[0]
            if sel.shape[0]:
                out[sel] = fk(points[sel], owner[sel])
        return out
    return f_batch


def _scalar_runs(params, x0, scales, **controls):
    f_batch = _objective(params, np)
    out = []
    for k in range(x0.shape[0]):
        f = lambda p, k=k: f_batch(p[None, :], np.array([k]))[0]          # noqa: E731
        out.append(amoeba_scalar(f, x0[k], scales[k], **controls))
    return out


def _host(xp, a):
    return a if xp is np else xp.asnumpy(a)


@pytest.mark.parametrize("d, controls, shared_scales", [
    (3, dict(ftol=1e-4, xtol=1e-4, itmax=120), False),
    (5, SPARX_MPI, True),
    (2, dict(ftol=1e-8, xtol=1e-6, itmax=0), False),
])
def test_batched_equals_scalar_bitwise(xp, rng, d, controls, shared_scales):
    n = 36
    params, x0, scales = _problem_set(rng, n, d)
    if shared_scales:
        scales = scales[0].copy()
        x0[params["kind"] == 3] = 1.0e17
    if controls["itmax"] == 0:           # no limit: leave out the problems that may never converge
        keep = ~np.isin(params["kind"], (2, 4))
        params = {key: v[keep] for key, v in params.items()}
        x0, scales = x0[keep], scales[keep]
        n = x0.shape[0]
    per_problem = scales if scales.ndim == 2 else np.broadcast_to(scales, (n, d))
    ref = _scalar_runs(params, x0, per_problem, **controls)
    xb, fb, it = amoeba_batched(_objective(params, xp), xp.asarray(x0), xp.asarray(scales), xp=xp, **controls)
    xb, fb, it = _host(xp, xb), _host(xp, fb), _host(xp, it)
    assert xb.dtype == np.float64 and fb.dtype == np.float64 and it.dtype == np.int64
    assert np.array_equal(xb, np.array([r[0] for r in ref]), equal_nan=True)
    assert np.array_equal(fb, np.array([r[1] for r in ref]), equal_nan=True)
    assert np.array_equal(it, np.array([r[2] for r in ref]))
    # the set really mixes the cases: immediate convergence, convergence on the way, the step limit
    assert (it == 0).any() and ((it > 0) & ((it < controls["itmax"]) | (controls["itmax"] == 0))).any()
    if controls["itmax"]:
        assert (it == controls["itmax"]).any()


def test_batched_passout_equals_scalar(xp, rng):
    n, d = 12, 3
    params, x0, scales = _problem_set(rng, n, d)
    f_plain = _objective(params, np)

    def f_scalar(k):
        return lambda p: (f_plain(p[None, :], np.array([k]))[0], np.array([2.0 * p[0] - p[2], float(k)]))

    ref = [amoeba_scalar(f_scalar(k), x0[k], scales[k], passout=True, **SPARX_SERIAL) for k in range(n)]
    f_xp = _objective(params, xp)

    def f_batch(points, owner):
        extra = xp.stack([2.0 * points[:, 0] - points[:, 2], owner.astype(xp.float64)], axis=1)
        return f_xp(points, owner), extra
    xb, fb, it, extra = amoeba_batched(f_batch, xp.asarray(x0), xp.asarray(scales), passout=True, xp=xp,
                                       **SPARX_SERIAL)
    assert np.array_equal(_host(xp, xb), np.array([r[0] for r in ref]), equal_nan=True)
    assert np.array_equal(_host(xp, extra), np.array([r[3] for r in ref]), equal_nan=True)
    assert np.array_equal(_host(xp, it), np.array([r[2] for r in ref]))


# --- the evaluation-count contract ------------------------------------------------------------------------------

def _evaluations_per_step(f, x0, scales, n_steps, **controls):
    """Scalar evaluations made in each of the n_steps steps (1 reflect, 2 expand, d + 1 or d + 2 shrink)."""
    memo = {}                                   # the reruns repeat each other's prefix: evaluate each point once

    def calls(itmax):
        count = [0]

        def g(p):
            count[0] += 1
            key = p.tobytes()
            if key not in memo:
                memo[key] = f(p)
            return memo[key]
        amoeba_scalar(g, x0, scales, **{**controls, "itmax": itmax})
        return count[0]
    cumulative = [len(x0) + 1] + [calls(s) for s in range(1, n_steps + 1)]
    return np.diff(cumulative)


def test_calls_per_step_and_compaction(rng):
    n, d = 8, 3
    controls = dict(ftol=1e-4, xtol=1e-4, itmax=60)
    params, x0, scales = _problem_set(rng, n, d)
    f_np = _objective(params, np)
    calls = []

    def f_batch(points, owner):
        calls.append(owner.copy())
        return f_np(points, owner)
    _, _, it = amoeba_batched(f_batch, x0, scales, **controls)

    # expected owner arrays, call by call, from the scalar reference's branch in each step
    per_step = [_evaluations_per_step(lambda p, k=k: f_np(p[None, :], np.array([k]))[0], x0[k], scales[k], it[k],
                                      **controls) for k in range(n)]
    expected = [np.repeat(np.arange(n), d + 1)]
    for s in range(int(it.max())):
        active = [k for k in range(n) if it[k] > s]
        expected.append(np.array(active))
        expand = [k for k in active if per_step[k][s] == 2]
        shrink = [k for k in active for _ in range(per_step[k][s] - 1) if per_step[k][s] > 2]
        if expand or shrink:
            expected.append(np.array(expand + shrink, dtype=np.int64))
    assert len(calls) == len(expected) <= 1 + 2 * it.max()
    for got, want in zip(calls, expected):
        assert np.array_equal(got, want)
    # compaction: each problem is evaluated exactly as often as the scalar reference evaluates it
    reflections = [len(e) for e in expected[1:]]
    assert reflections[-1] < n and sum(len(c) for c in calls) == sum(len(c) for c in expected)
    for k in range(n):
        assert sum(int(np.count_nonzero(c == k)) for c in calls) == d + 1 + int(per_step[k].sum())


# --- scales and argument checks ---------------------------------------------------------------------------------

def test_local_ali3d_scales_follow_sparx_weight_phi():
    theta = np.array([90.0, 0.0, 180.0, 30.0, 120.0, 91.0, np.nan])
    delta, ts = 2.0, 0.25
    s = local_ali3d_scales(theta, delta, ts)
    w = [max(delta, delta * abs((t - 90.0) / 180.0 * math.pi)) for t in theta.tolist()]
    assert s.shape == (7, 5) and s.dtype == np.float64
    assert s[:, 0].tolist() == w and s[:, 2].tolist() == w
    assert (s[:, 1] == delta).all() and (s[:, 3:] == ts).all()
    assert s[1, 0] == delta * math.pi / 2 and s[0, 0] == delta and s[-1, 0] == delta


@pytest.mark.parametrize("kwargs, match", [
    (dict(ftol=0.0, xtol=0.0), "both <= 0"),
    (dict(itmax=-1), "itmax"),
    (dict(itmax=2.5), "itmax"),
])
def test_bad_controls_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        amoeba_scalar(lambda p: 0.0, [0.0], [1.0], **kwargs)
    with pytest.raises(ValueError, match=match):
        amoeba_batched(lambda p, o: np.zeros(len(p)), np.zeros((2, 1)), [1.0], **kwargs)


def test_bad_shapes_and_scales_are_refused():
    with pytest.raises(ValueError, match="scales"):
        amoeba_scalar(lambda p: 0.0, [0.0, 0.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="scales"):
        amoeba_batched(lambda p, o: np.zeros(len(p)), np.zeros((2, 2)), np.ones(3))
    with pytest.raises(ValueError, match="x0"):
        amoeba_batched(lambda p, o: np.zeros(len(p)), np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="values of shape"):
        amoeba_batched(lambda p, o: np.zeros(1), np.zeros((2, 2)), np.ones(2))
    with pytest.raises(ValueError, match="ts="):
        local_ali3d_scales(np.zeros(3), 2.0, 0.0)
