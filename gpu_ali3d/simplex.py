"""The downhill-simplex maximiser of SPARX (``utilities.amoeba`` / ``amoeba_multi_level``), one start point or many.

SPARX refines every particle's pose with T. Metcalf's "amoeba" (version 1.2), a Nelder-Mead variant with fixed
coefficients and a whole-simplex shrink. Its rules, stated once here and followed exactly by both functions below
(``d`` variables, ``d + 1`` vertices numbered 0..d):

* Initial simplex: vertex 0 is the start point x0; vertex i + 1 is x0 with ``scales[i]`` added to coordinate i.
  All d + 1 vertices are evaluated.
* Each step begins by choosing the best and the worst vertex in one pass over 0..d: a vertex becomes the best if
  its value is strictly greater than the current best's, the worst if strictly smaller than the current worst's.
  So ties go to the lowest index, and when all values are equal best = worst = vertex 0. (A NaN value never wins
  a comparison, so it is only picked if it sits at vertex 0.)
* Centroid ``c`` = sum of the vertices other than the worst, added in index order, divided by d.
* Convergence test, before every step (also before the first):
  ``frange = |f_best - f_worst| / ((|f_best| + |f_worst|) / 2)`` (0 when that denominator is 0) and
  ``xdist = sum_i |c_i - worst_i| / scales[i] / d``, the mean over coordinates of the worst vertex's distance from
  the centroid in units of the *initial* scales. Stop if ``(ftol <= 0 or frange < ftol) and
  (xtol <= 0 or xdist < xtol)``, or if ``itmax > 0 and steps >= itmax``. (itmax = 0 means no limit.)
* Reflection ``r = 2 c - worst``, evaluated.
  - ``f(r) <= f_worst``: shrink. Every vertex other than the best and the worst moves to ``0.5 best + 0.5 v`` and
    is re-evaluated; the new vertex is the midpoint ``0.5 best + 0.5 worst`` (r is discarded).
  - else ``f(r) >= f_best``: expansion ``e = 3 c - 2 worst``, evaluated; the new vertex is e if ``f(e) > f(r)``
    (strictly), else r.
  - else: the new vertex is r.
  The new vertex replaces the worst (whatever the branch), and the step count goes up by one.
* Returned: the best vertex found by the last convergence test, its value, and the number of completed steps.
  ``steps == itmax`` (itmax > 0) means the limit was hit, not convergence.

Two consequences of the rules: the f test is relative, so near a maximum value of 0 it can hardly be met (the
range never becomes small against the magnitudes); and a NaN value is never best or worst except at vertex 0,
where it makes ``frange`` NaN, so an objective that can return NaN may keep a simplex from converging: it then
runs to itmax (forever when itmax = 0).

The objective is *maximised*. Positions are float64 in the objective's own units (degrees and pixels for
local_ali3d); ``scales`` are in the same units. SPARX's settings for local_ali3d (``applications.py``):

* serial ``local_ali3d``: ``amoeba_multi_level(angles, [w, delta, w], eqproj_cascaded_ccc, 1e-4, 1e-4, 500)``
  (:data:`SPARX_SERIAL`);
* MPI ``local_ali3d_MPI``: the same with ftol = 1.0, xtol = 1e-2, itmax = 500 (:data:`SPARX_MPI`). ftol = 1.0 is
  very loose: it only asks that f_best and f_worst differ by less than their mean magnitude (met by any two values
  of one sign within a factor 3), so the x test, 1/100 of the initial steps, usually decides;
* the 2-D peak refinement inside ``eqproj_cascaded_ccc``: ``amoeba(peak, [1.1, 1.1], ..., 1e-4, 1e-4, 500)``.

In SPARX the simplex of local_ali3d is over the three angles only; the shifts are found inside each evaluation
and carried out as the "pass-out" value of ``amoeba_multi_level``, the one belonging to the returned best vertex.
``passout=True`` reproduces that; :func:`local_ali3d_scales` also offers a 5-parameter (angles and shifts) form.
"""
from __future__ import annotations

import math
from types import ModuleType

import numpy as np

#: serial ``local_ali3d`` (and ``amoeba``'s defaults)
SPARX_SERIAL = {"ftol": 1.0e-4, "xtol": 1.0e-4, "itmax": 500}
#: ``local_ali3d_MPI``
SPARX_MPI = {"ftol": 1.0, "xtol": 1.0e-2, "itmax": 500}


def amoeba_scalar(f, x0, scales, *, ftol=1.0e-4, xtol=1.0e-4, itmax=500, data=None, passout=False):
    """Maximise f from one start point with SPARX's amoeba rules (module docstring); the reference, in plain Python.

    f : callable. Called as ``f(x)`` (or ``f(x, data)`` when data is not None) with x a fresh float64 array (d,);
        returns the value, or ``(value, extra)`` when passout is True (``amoeba_multi_level``).
    x0 : array-like (d,), the start point. scales : array-like (d,), nonzero and finite, the initial steps, same units.
    ftol, xtol : relative function range and mean scaled distance below which the simplex has converged; a value
        <= 0 switches that test off (not both). itmax : int >= 0, the most steps; 0 = no limit.

    Returns ``(x_best, f_best, n_steps)``: float64 array (d,), float, int; with passout also ``extra`` of x_best.
    """
    x0, scales = _check_vectors(x0, scales)
    _check_controls(ftol, xtol, itmax)
    nvar = len(x0)
    nsimplex = nvar + 1

    def evaluate(point):
        x = np.array(point, dtype=np.float64)
        out = f(x) if data is None else f(x, data)
        value, extra = out if passout else (out, None)
        return float(value), extra

    simplex = [list(x0)]
    for i in range(nvar):
        vertex = list(x0)
        vertex[i] += scales[i]
        simplex.append(vertex)
    fvalue = [evaluate(v) for v in simplex]        # (value, extra) per vertex

    iteration = 0
    while True:
        ssbest = ssworst = 0
        for i in range(nsimplex):
            if fvalue[i][0] > fvalue[ssbest][0]:
                ssbest = i
            if fvalue[i][0] < fvalue[ssworst][0]:
                ssworst = i

        pavg = [0.0] * nvar
        for i in range(nsimplex):
            if i != ssworst:
                for j in range(nvar):
                    pavg[j] += simplex[i][j]
        for j in range(nvar):
            pavg[j] = pavg[j] / nvar
        simscale = 0.0
        for j in range(nvar):
            simscale += abs(pavg[j] - simplex[ssworst][j]) / scales[j]
        simscale = simscale / nvar

        fbest, fworst = fvalue[ssbest][0], fvalue[ssworst][0]
        fscale = (abs(fbest) + abs(fworst)) / 2.0
        frange = abs(fbest - fworst) / fscale if fscale != 0.0 else 0.0

        if (((ftol <= 0.0 or frange < ftol) and (xtol <= 0.0 or simscale < xtol))
                or (itmax and iteration >= itmax)):
            x_best = np.array(simplex[ssbest], dtype=np.float64)
            if passout:
                return x_best, fvalue[ssbest][0], iteration, fvalue[ssbest][1]
            return x_best, fvalue[ssbest][0], iteration

        worst = simplex[ssworst]
        pnew = [2.0 * pavg[j] - worst[j] for j in range(nvar)]
        fnew = evaluate(pnew)
        if fnew[0] <= fworst:                                   # shrink towards the best vertex
            best = simplex[ssbest]
            for i in range(nsimplex):
                if i != ssbest and i != ssworst:
                    simplex[i] = [0.5 * best[j] + 0.5 * simplex[i][j] for j in range(nvar)]
                    fvalue[i] = evaluate(simplex[i])
            pnew = [0.5 * best[j] + 0.5 * worst[j] for j in range(nvar)]
            fnew = evaluate(pnew)
        elif fnew[0] >= fbest:                                  # try the expansion
            pnew2 = [3.0 * pavg[j] - 2.0 * worst[j] for j in range(nvar)]
            fnew2 = evaluate(pnew2)
            if fnew2[0] > fnew[0]:
                pnew, fnew = pnew2, fnew2
        simplex[ssworst] = pnew
        fvalue[ssworst] = fnew
        iteration += 1


def amoeba_batched(f_batch, x0, scales, *, ftol=1.0e-4, xtol=1.0e-4, itmax=500, passout=False,
                   xp: ModuleType = np):
    """Maximise n independent problems with SPARX's amoeba rules, all simplices advanced in lockstep.

    Per problem every decision, every vertex and every returned number is bitwise the one
    :func:`amoeba_scalar` gives (float64, no fused operations; shown by tests/test_simplex.py).

    f_batch : callable ``f_batch(points, owner) -> values``. points : float64 xp array (m, d); owner : int64 xp array
        (m,), the problem (0..n-1) each point belongs to; values : array (m,), stored as float64. With passout,
        returns ``(values, extra)`` with extra an array (m, k), k fixed (``amoeba_multi_level``'s pass-out).
    x0 : array (n, d), start points. scales : array (n, d) or (d,), nonzero and finite, initial steps.
    ftol, xtol, itmax : as in :func:`amoeba_scalar`, shared by all problems.
    xp : the array module (numpy or cupy); all work stays on its arrays.

    Calls to f_batch: one for the n (d + 1) initial vertices, then per step at most two: one with the reflections
    of all still active problems (one point each, owners ascending), then, only if some problem needs them, one
    with the follow-ups: the expansions (one point per expanding problem, owners ascending) followed by the shrunk
    vertices (d points per shrinking problem, d + 1 when all its values were equal; in problem then vertex order).
    A problem that has converged is dropped from the active set and never evaluated again.

    Returns ``(x_best, f_best, n_steps)``: float64 (n, d), float64 (n,), int64 (n,) xp arrays; with passout also
    ``extra`` (n, k) of each x_best.
    """
    x0 = xp.asarray(x0, dtype=xp.float64)
    if x0.ndim != 2 or x0.shape[1] < 1:
        raise ValueError(f"x0 has shape {x0.shape}; expected (n, d) start points with d >= 1")
    n, d = x0.shape
    scales = xp.asarray(scales, dtype=xp.float64)
    if scales.shape not in ((d,), (n, d)):
        raise ValueError(f"scales has shape {scales.shape}; expected ({d},) or ({n}, {d}) like x0")
    if not bool(xp.all(xp.isfinite(scales) & (scales != 0.0))):
        raise ValueError("scales must be finite and nonzero (the convergence test divides by them)")
    _check_controls(ftol, xtol, itmax)
    scales = xp.ascontiguousarray(xp.broadcast_to(scales, (n, d)))
    nv = d + 1
    if n == 0:
        empty = (xp.empty((0, d), dtype=xp.float64), xp.empty(0, dtype=xp.float64), xp.empty(0, dtype=xp.int64))
        return empty + (xp.empty((0, 0), dtype=xp.float64),) if passout else empty

    simplex = xp.empty((n, nv, d), dtype=xp.float64)
    simplex[...] = x0[:, None, :]
    for i in range(d):
        simplex[:, i + 1, i] = x0[:, i] + scales[:, i]
    owner = xp.arange(n, dtype=xp.int64)
    values, extra = _evaluate(f_batch, simplex.reshape(n * nv, d), xp.repeat(owner, nv), passout, xp)
    fvalue = values.reshape(n, nv)
    pout = extra.reshape(n, nv, extra.shape[1])

    x_best = xp.empty((n, d), dtype=xp.float64)
    f_best = xp.empty(n, dtype=xp.float64)
    n_steps = xp.empty(n, dtype=xp.int64)
    extra_best = xp.empty((n, pout.shape[2]), dtype=pout.dtype)

    step = 0
    while owner.shape[0]:
        na = owner.shape[0]
        rows = xp.arange(na)
        best, worst = _best_and_worst(fvalue, xp)
        pavg = xp.zeros((na, d), dtype=xp.float64)
        for i in range(nv):
            pavg = xp.where((worst != i)[:, None], pavg + simplex[:, i], pavg)
        pavg = pavg / d
        p_worst = simplex[rows, worst]
        simscale = xp.zeros(na, dtype=xp.float64)
        for j in range(d):
            simscale = simscale + xp.abs(pavg[:, j] - p_worst[:, j]) / scales[:, j]
        simscale = simscale / d
        fb, fw = fvalue[rows, best], fvalue[rows, worst]
        fscale = (xp.abs(fb) + xp.abs(fw)) / 2.0
        nonzero = fscale != 0.0
        frange = xp.where(nonzero, xp.abs(fb - fw) / xp.where(nonzero, fscale, 1.0), 0.0)

        done = xp.ones(na, dtype=bool)
        if ftol > 0.0:
            done &= frange < ftol
        if xtol > 0.0:
            done &= simscale < xtol
        if itmax and step >= itmax:
            done[...] = True
        finished = xp.nonzero(done)[0]
        if finished.shape[0]:
            who = owner[finished]
            x_best[who] = simplex[finished, best[finished]]
            f_best[who] = fb[finished]
            n_steps[who] = step
            extra_best[who] = pout[finished, best[finished]]
            active = xp.nonzero(~done)[0]
            if active.shape[0] == 0:
                break
            owner, scales, simplex, fvalue, pout = (a[active] for a in (owner, scales, simplex, fvalue, pout))
            best, worst, pavg, p_worst, fb, fw = (a[active] for a in (best, worst, pavg, p_worst, fb, fw))
            na = owner.shape[0]
            rows = xp.arange(na)

        # reflection: one call for every active problem
        p_new = 2.0 * pavg - p_worst
        f_new, e_new = _evaluate(f_batch, p_new, owner, passout, xp)
        shrink = f_new <= fw
        expand = ~shrink & (f_new >= fb)

        # follow-ups: expansions, then shrunk vertices, in one call
        ie = xp.nonzero(expand)[0]
        isk = xp.nonzero(shrink)[0]
        ne, ns = ie.shape[0], isk.shape[0]
        if ne + ns:
            p_exp = 3.0 * pavg[ie] - 2.0 * p_worst[ie]
            b_s = best[isk]
            p_best_s = simplex[isk, b_s]
            shrunk = 0.5 * p_best_s[:, None, :] + 0.5 * simplex[isk]        # the midpoint sits at the worst's slot
            vid = xp.arange(nv)[None, :]
            moved = (vid != b_s[:, None]) | (vid == worst[isk][:, None])    # all but the best (best == worst: all)
            owner_s = xp.broadcast_to(owner[isk][:, None], (ns, nv))[moved]
            f_fu, e_fu = _evaluate(f_batch, xp.concatenate([p_exp, shrunk[moved]]),
                                   xp.concatenate([owner[ie], owner_s]), passout, xp)
            if ne:
                better = f_fu[:ne] > f_new[ie]
                p_new[ie] = xp.where(better[:, None], p_exp, p_new[ie])
                f_new[ie] = xp.where(better, f_fu[:ne], f_new[ie])
                e_new[ie] = xp.where(better[:, None], e_fu[:ne], e_new[ie])
            if ns:
                sub_x, sub_f, sub_e = simplex[isk], fvalue[isk], pout[isk]
                sub_x[moved] = shrunk[moved]
                sub_f[moved] = f_fu[ne:]
                sub_e[moved] = e_fu[ne:]
                simplex[isk], fvalue[isk], pout[isk] = sub_x, sub_f, sub_e
                w_s = worst[isk]
                p_new[isk] = sub_x[xp.arange(ns), w_s]
                f_new[isk] = sub_f[xp.arange(ns), w_s]
                e_new[isk] = sub_e[xp.arange(ns), w_s]

        simplex[rows, worst] = p_new
        fvalue[rows, worst] = f_new
        pout[rows, worst] = e_new
        step += 1

    if passout:
        return x_best, f_best, n_steps, extra_best
    return x_best, f_best, n_steps


def local_ali3d_scales(theta_deg, delta, ts, *, xp: ModuleType = np):
    """Initial simplex steps of local_ali3d for (phi, theta, psi, sx, sy), one row per image.

    theta_deg : array (n,), each image's current theta, degrees. delta : angular step, degrees (SPARX --delta).
    ts : shift step, pixels (SPARX --ts), used for both sx and sy.
    Returns float64 (n, 5): ``[w, delta, w, ts, ts]`` with ``w = max(delta, delta * |(theta - 90) / 180 * pi|)``,
    computed in SPARX's operation order (``applications.py``, ``weight_phi``): phi and psi get wider steps away
    from the equator. SPARX's own simplex uses only the first three columns (the shifts are optimised inside each
    evaluation, see the module docstring); take ``[:, :3]`` for that.
    """
    theta = xp.asarray(theta_deg, dtype=xp.float64)
    if theta.ndim != 1:
        raise ValueError(f"theta_deg has shape {theta.shape}; expected (n,)")
    delta, ts = float(delta), float(ts)
    if not (math.isfinite(delta) and delta > 0.0):
        raise ValueError(f"delta={delta} is not a positive angle; use --delta > 0 (degrees)")
    if not (math.isfinite(ts) and ts > 0.0):
        raise ValueError(f"ts={ts} is not a positive shift step for a 5-parameter simplex; use --ts > 0 (pixels)")
    wide = delta * xp.abs((theta - 90.0) / 180.0 * math.pi)
    w = xp.where(wide > delta, wide, delta)                     # Python max(delta, wide): delta unless wide > delta
    out = xp.empty((theta.shape[0], 5), dtype=xp.float64)
    out[:, 0] = w
    out[:, 1] = delta
    out[:, 2] = w
    out[:, 3] = ts
    out[:, 4] = ts
    return out


def _best_and_worst(fvalue, xp):
    """Indices (na,) of the best and worst vertex per row, chosen as SPARX does (strict comparisons, in index order)."""
    na, nv = fvalue.shape
    best = xp.zeros(na, dtype=xp.int64)
    worst = xp.zeros(na, dtype=xp.int64)
    f_b = fvalue[:, 0]
    f_w = fvalue[:, 0]
    for i in range(1, nv):
        fi = fvalue[:, i]
        up = fi > f_b
        down = fi < f_w
        best = xp.where(up, i, best)
        f_b = xp.where(up, fi, f_b)
        worst = xp.where(down, i, worst)
        f_w = xp.where(down, fi, f_w)
    return best, worst


def _evaluate(f_batch, points, owner, passout, xp):
    """Call f_batch once; return float64 values (m,) and pass-out (m, k) (k = 0 without passout)."""
    m = points.shape[0]
    out = f_batch(xp.ascontiguousarray(points), owner)
    if passout:
        values, extra = out
        extra = xp.asarray(extra)
        if extra.ndim != 2 or extra.shape[0] != m:
            raise ValueError(f"f_batch returned pass-out of shape {extra.shape} for {m} points; expected ({m}, k)")
    else:
        values, extra = out, xp.empty((m, 0), dtype=xp.float64)
    values = xp.asarray(values, dtype=xp.float64)
    if values.shape != (m,):
        raise ValueError(f"f_batch returned values of shape {values.shape} for {m} points; expected ({m},)")
    return values, extra


def _check_vectors(x0, scales):
    x0 = np.asarray(x0, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    if x0.ndim != 1 or x0.shape[0] < 1:
        raise ValueError(f"x0 has shape {x0.shape}; expected one start point (d,) with d >= 1")
    if scales.shape != x0.shape:
        raise ValueError(f"scales has shape {scales.shape}; expected {x0.shape} like x0")
    if not np.all(np.isfinite(scales) & (scales != 0.0)):
        raise ValueError(f"scales={scales.tolist()} must be finite and nonzero (the convergence test divides by them)")
    return [float(v) for v in x0], [float(v) for v in scales]


def _check_controls(ftol, xtol, itmax):
    if ftol <= 0.0 and xtol <= 0.0:
        raise ValueError(f"ftol={ftol} and xtol={xtol} are both <= 0, which stops before the first step; "
                         "make at least one positive")
    if isinstance(itmax, bool) or not isinstance(itmax, (int, np.integer)) or itmax < 0:
        raise ValueError(f"itmax={itmax!r} is not an integer >= 0; use 500 (SPARX) or 0 for no limit")
