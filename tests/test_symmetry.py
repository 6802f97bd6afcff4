"""Point groups (gpu_ali3d.symmetry): order, closure, SPARX orientation, and the side on which S acts on a pose."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_ali3d.geometry import angular_distance, euler_from_matrix, rotation_matrix
from gpu_ali3d.symmetry import (
    angular_distance_sym,
    parse_sym,
    symmetry_mates,
    symmetry_order,
    symmetry_rotations,
)

GROUPS = {"c1": 1, "c2": 2, "c5": 5, "c12": 12, "d1": 2, "d2": 4, "d3": 6, "d7": 14, "tet": 12, "oct": 24,
          "icos": 60}


def _random_poses(rng, n):
    return np.stack([rng.uniform(0, 360, n), rng.uniform(0, 180, n), rng.uniform(0, 360, n),
                     rng.normal(0, 3, n), rng.normal(0, 3, n)], axis=1)


def _same_set(a, b, tol=1e-9):
    d = np.abs(a[:, None] - b[None]).max(axis=(2, 3))
    return d.min(axis=1).max() < tol and d.min(axis=0).max() < tol


def _axes(ops, fold):
    """Unit axes (sign-normalised) of the operators that rotate by 360/fold degrees."""
    out = []
    for s in ops:
        angle = np.degrees(np.arccos(np.clip((np.trace(s) - 1) / 2, -1, 1)))
        if abs(angle - 360.0 / fold) > 1e-6:
            continue
        w, v = np.linalg.eig(s)
        a = np.real(v[:, np.argmin(np.abs(w - 1))])
        lead = a[np.nonzero(np.abs(a) > 1e-9)[0][-1]]            # last clearly non-zero component > 0
        out.append(np.where(np.abs(a) > 1e-12, a, 0.0) * np.sign(lead))
    return np.array(out)


def _n_axes(ops, fold):
    """Number of distinct rotation axes carrying a rotation by 360/fold degrees."""
    axes = _axes(ops, fold)
    return len({tuple(np.round(a, 6)) for a in axes})


def _has_axis(ops, fold, axis):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    found = _axes(ops, fold)
    return len(found) > 0 and np.abs(np.abs(found @ axis) - 1).min() < 1e-9


# ----------------------------------------------------------------------------------------------- the groups
@pytest.mark.parametrize("sym,order", GROUPS.items())
def test_order_closure_and_rotations(sym, order):
    ops = symmetry_rotations(sym)
    assert ops.shape == (order, 3, 3) and ops.dtype == np.float64
    assert symmetry_order(sym) == order
    np.testing.assert_allclose(ops[0], np.eye(3), atol=1e-15)
    np.testing.assert_allclose(np.einsum("kij,klj->kil", ops, ops), np.broadcast_to(np.eye(3), ops.shape),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(ops), 1.0, atol=1e-12)
    # no duplicates, closed under products and inverses
    d = np.abs(ops[:, None] - ops[None]).max(axis=(2, 3))
    assert (d + np.eye(order) * 10).min() > 1e-3
    assert _same_set(np.einsum("aij,bjk->abik", ops, ops).reshape(-1, 3, 3), ops)
    assert _same_set(ops.transpose(0, 2, 1), ops)


def test_case_insensitive_and_returns_copy():
    np.testing.assert_array_equal(symmetry_rotations("ICOS"), symmetry_rotations("icos"))
    np.testing.assert_array_equal(symmetry_rotations(" D5 "), symmetry_rotations("d5"))
    ops = symmetry_rotations("c3")
    ops[:] = 0
    assert symmetry_rotations("c3")[0, 0, 0] == 1.0


@pytest.mark.parametrize("sym,expected", [("c1", ("c", 1)), ("C7", ("c", 7)), ("d4", ("d", 4)),
                                          ("tet", ("tet", 3)), ("Oct", ("oct", 4)), ("icos", ("icos", 5))])
def test_parse_sym(sym, expected):
    assert parse_sym(sym) == expected


@pytest.mark.parametrize("bad", ["c0", "d0", "d", "c", "foo", "c-1", "c1.5", "i", "tetra", "", "c 2", "h2"])
def test_parse_sym_rejects(bad):
    with pytest.raises(ValueError, match="point group"):
        symmetry_rotations(bad)


def test_parse_sym_rejects_non_string():
    with pytest.raises(TypeError):
        parse_sym(5)


# ----------------------------------------------------------------------------------------------- orientation
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_dihedral_orientation_matches_sparx(n):
    """N-fold on z, first two-fold along x: EMAN2 libEM/symmetry.cpp DSym::get_sym (EMAN az = k 360/N,
    alt = 180) and SPARX symclass (SPIDER (0, 180, k 360/N + 180 (N odd))) give this same set."""
    ops = symmetry_rotations(f"d{n}")
    assert _has_axis(ops, 2, (1, 0, 0))
    if n > 1:
        assert _has_axis(ops, n, (0, 0, 1))
    sparx = [rotation_matrix(0, 0, 360.0 * k / n) for k in range(n)]
    sparx += [rotation_matrix(0, 180, (360.0 * k / n + 180.0 * (n % 2)) % 360) for k in range(n)]
    assert _same_set(ops, np.array(sparx))


def test_polyhedral_orientation_matches_sparx():
    """SPARX orientation, written as SPARX's symclass (sparx/libpy/fundamentals.py) lists it in SPIDER angles; the
    same sets as the matrices of Transform::get_sym_proj that the nn4 reconstructors use."""
    lvl_tet = np.degrees(np.arccos(-1.0 / 3.0))
    tet = [(0, 0, p) for p in (0, 120, 240)] + [(a, lvl_tet, p) for a in (0, 120, 240) for p in (60, 180, 300)]
    quarter = (0, 90, 180, 270)
    octa = ([(0, 0, p) for p in quarter] + [(a, 90, p) for p in quarter for a in quarter]
            + [(0, 180, p) for p in quarter])
    l1 = np.degrees(np.arctan(2.0))
    fifth, fifth_off = range(0, 289, 72), range(36, 325, 72)
    icos = ([(0, 0, p) for p in fifth] + [(a, l1, p) for a in fifth for p in fifth_off]
            + [(a, 180 - l1, p) for a in fifth_off for p in fifth] + [(0, 180, p) for p in fifth])
    for sym, angles in (("tet", tet), ("oct", octa), ("icos", icos)):
        expected = np.array([rotation_matrix(*a) for a in angles])
        assert _same_set(symmetry_rotations(sym), expected, tol=1e-9), sym


def test_polyhedral_axes():
    tet, octa, icos = (symmetry_rotations(s) for s in ("tet", "oct", "icos"))
    # tet: 3-fold on z, a 2-fold in the xz plane at polar angle 54.74 deg. (EMAN2's own TetrahedralSym has that
    # 2-fold in the yz plane instead: a different orientation, not used by SPARX's reconstructors.)
    assert _has_axis(tet, 3, (0, 0, 1))
    assert _has_axis(tet, 2, (np.sqrt(2.0), 0, 1))
    assert not _has_axis(tet, 2, (0, np.sqrt(2.0), 1)) and not _has_axis(tet, 2, (0, -np.sqrt(2.0), 1))
    for axis in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
        assert _has_axis(octa, 4, axis)
    # icos: 5-fold on z, a 5-fold in the xz plane at polar angle atan(2), a 2-fold along y
    assert _has_axis(icos, 5, (0, 0, 1))
    assert _has_axis(icos, 5, (2, 0, 1))
    assert _has_axis(icos, 2, (0, 1, 0))
    assert [_n_axes(icos, fold) for fold in (5, 3, 2)] == [6, 10, 15]
    assert [_n_axes(octa, fold) for fold in (4, 3, 2)] == [3, 4, 9]
    assert [_n_axes(tet, fold) for fold in (3, 2)] == [4, 3]


# ----------------------------------------------------------------------------------------------- action on poses
class _SymmetricBlobs:
    """Sum of Gaussians at the orbit {S x0 : S in G} of generic points x0: V(S x) = V(x) for every S in G.

    Its Fourier transform is analytic: F(k) = exp(-2 pi^2 sigma^2 |k|^2) sum_{S, x0} exp(-2 pi i k . S x0).
    """

    def __init__(self, ops, rng, sigma=0.08):
        x0 = rng.uniform(-0.5, 0.5, (3, 3))                        # three generic points
        self.centres = np.einsum("kij,pj->kpi", ops, x0).reshape(-1, 3)
        self.sigma = sigma

    def ft(self, k):
        """k : (..., 3) frequencies (cycles per unit length) -> complex (...)."""
        phase = np.exp(-2j * np.pi * (k @ self.centres.T))
        return np.exp(-2 * np.pi**2 * self.sigma**2 * np.sum(k * k, axis=-1)) * phase.sum(axis=-1)


def _central_section(obj, pose, k2):
    """Values of obj's transform on the central section of `pose` at in-plane frequencies k2 (m, 2)."""
    r = rotation_matrix(pose[0], pose[1], pose[2])
    k3 = np.concatenate([k2, np.zeros((len(k2), 1))], axis=1)
    return obj.ft(k3 @ r)                                           # rows of k3 @ R are R.T @ k


@pytest.mark.parametrize("sym", list(GROUPS))
def test_mates_give_identical_central_sections(sym, rng):
    ops = symmetry_rotations(sym)
    obj = _SymmetricBlobs(ops, rng)
    k2 = rng.uniform(-3, 3, (64, 2))
    poses = _random_poses(rng, 3)
    poses[0, 1] = 0.0                                               # include gimbal lock
    mates = symmetry_mates(poses, sym)
    assert mates.shape == (3, len(ops), 5)
    np.testing.assert_array_equal(mates[..., 3:], np.broadcast_to(poses[:, None, 3:], mates[..., 3:].shape))
    for pose, pose_mates in zip(poses, mates):
        ref = _central_section(obj, pose, k2)
        assert np.abs(ref).max() > 1e-3                             # the test object is not trivially zero
        for mate in pose_mates:
            # float64 phases of O(10) radians: agreement to ~1e-12 of the magnitude
            np.testing.assert_allclose(_central_section(obj, mate, k2), ref, rtol=0, atol=1e-9)
        if len(ops) > 1 and 0 < pose[1] < 180:
            # the other side, S @ R, does not give the same section: the side matters (at theta = 0 a cyclic
            # group's S commutes with R, so the check needs a generic pose)
            r = rotation_matrix(*pose[:3])
            wrong = np.einsum("kij,jl->kil", ops[1:], r)
            worst = max(np.abs(_central_section(obj, _angles(w), k2) - ref).max() for w in wrong)
            assert worst > 1e-3


def _angles(r):
    return np.array([float(a) for a in euler_from_matrix(r)])


@pytest.mark.parametrize("sym", list(GROUPS))
def test_angular_distance_sym_of_mates_is_zero(sym, rng):
    poses = _random_poses(rng, 20)
    mates = symmetry_mates(poses, sym)
    k = mates.shape[1]
    # mate 0 is the pose itself
    assert angular_distance(mates[:, 0], poses).max() < 1e-9
    for j in range(k):
        assert angular_distance_sym(poses, mates[:, j], sym).max() < 1e-9
        assert angular_distance_sym(mates[:, j], poses, sym).max() < 1e-9
    if k > 1:
        # distinct mates are distinct rotations
        assert angular_distance(mates[:, 1], poses).min() > 1.0


@pytest.mark.parametrize("sym", ["c1", "c4", "d3", "tet", "oct", "icos"])
def test_angular_distance_sym_is_min_over_mates(sym, rng):
    a, b = _random_poses(rng, 40), _random_poses(rng, 40)
    mates = symmetry_mates(b, sym)
    brute = np.array([angular_distance(np.repeat(a[i:i + 1], mates.shape[1], 0), mates[i]).min()
                      for i in range(len(a))])
    np.testing.assert_allclose(angular_distance_sym(a, b, sym), brute, atol=1e-9)
    if sym == "c1":
        np.testing.assert_allclose(angular_distance_sym(a, b, sym), angular_distance(a, b), atol=1e-12)
    # small perturbations of a mate: the distance is the perturbation, kept exactly near 0
    turn = rotation_matrix(0.0, 1e-5, 0.0)
    near = mates[:, -1].copy()
    r = np.einsum("ij,njk->nik", turn, rotation_matrix(near[:, 0], near[:, 1], near[:, 2]))
    near[:, :3] = np.stack(euler_from_matrix(r), axis=1)
    np.testing.assert_allclose(angular_distance_sym(near, b, sym), 1e-5, atol=1e-9)
