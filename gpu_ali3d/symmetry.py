"""Point-group symmetry as SPARX applies it to projection poses.

Groups and their orientation (what SPARX's reconstructors use, EMAN2 ``libEM``):

* ``cN``: the N-fold axis is z. ``dN``: cN plus N two-fold axes perpendicular to z, the first one along x
  (``DSym::get_sym``: EMAN angles alt = 180, az = k 360/N, i.e. ``diag(1, -1, -1) @ Rz(k 360/N)``).
* ``tet`` (order 12): a three-fold axis along z and a two-fold axis in the xz plane at polar angle
  arccos(1/sqrt(3)) = 54.74 deg (azimuth 0), hence the other three-fold axes at polar angle 109.47 deg and azimuths
  0, 120, 240 deg.
* ``oct`` (order 24): four-fold axes along x, y and z.
* ``icos`` (order 60): a five-fold axis along z, the next five-fold axis in the xz plane at polar angle
  arctan(2) = 63.43 deg (azimuth 0), and a two-fold axis along y.

Sources (EMAN2, github cryoem/eman2): the SPARX reconstructors (``libEM/reconstructor.cpp``,
``nn4Reconstructor::insert_padfft_slice`` and the nn4_ctf variants) take their operators from
``Transform::get_sym_proj`` (``libEM/transform.cpp``): for tet, oct and icos a fixed table of matrices, for cN and
dN ``CSym::get_sym`` / ``DSym::get_sym`` (``libEM/symmetry.cpp``). SPARX's python ``symclass``
(``sparx/libpy/fundamentals.py``) describes the same groups in SPIDER angles. Caution: EMAN2's own
``TetrahedralSym::get_sym`` is this group turned by -90 (equivalently +30) deg about z, with a two-fold axis in
the yz plane; EMAN2's oct and icos in ``symmetry.cpp`` are the same sets as SPARX's. gpu-ali3d follows SPARX.

How the operators act on a pose (conventions in :mod:`gpu_ali3d.geometry`): a map symmetric under the group,
``V(S x) = V(x)`` for every S, has ``F(S k) = F(k)``. A projection at R samples F at ``R.T @ k``, and
``(R @ S).T @ k = S.T @ (R.T @ k)``, so the poses ``R`` and ``R @ S`` (S in the group) give identical projections,
with the same in-plane shift. This is the side SPARX uses: ``get_sym_proj`` returns ``Transform * S``.
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from .geometry import _pose_pair, _as_poses, _rotation_angle_deg, euler_from_matrix, rotation_matrix

#: Polyhedral groups: the fold of the axis along z, and the group order.
_POLYHEDRAL = {"tet": (3, 12), "oct": (4, 24), "icos": (5, 60)}


def parse_sym(sym: str) -> tuple[str, int]:
    """Validate a SPARX symmetry name -> (kind, n).

    sym : "c1", "cN", "dN" (N >= 1), "tet", "oct" or "icos", case-insensitive.
    Returns kind in {"c", "d", "tet", "oct", "icos"} and n, the fold of the symmetry axis along z
    (N for cN and dN; 3, 4, 5 for tet, oct, icos).
    """
    if not isinstance(sym, str):
        raise TypeError(f"sym must be a string such as 'c1', 'c5', 'd7', 'tet', 'oct' or 'icos'; "
                        f"got {type(sym).__name__}")
    s = sym.strip().lower()
    if s in _POLYHEDRAL:
        return s, _POLYHEDRAL[s][0]
    m = re.fullmatch(r"([cd])([0-9]+)", s)
    if m is None or int(m.group(2)) < 1:
        raise ValueError(f"sym={sym!r} is not a point group; use cN or dN with N >= 1 (e.g. c1, c5, d2), "
                         "tet, oct or icos")
    return m.group(1), int(m.group(2))


def symmetry_order(sym: str) -> int:
    """Number of operators of the group (cN: N, dN: 2N, tet 12, oct 24, icos 60)."""
    return _order(*parse_sym(sym))


def symmetry_rotations(sym: str) -> np.ndarray:
    """The rotation operators of a point group in SPARX's orientation (module docstring).

    Returns float64 (k, 3, 3), the identity first. For cN the k-th operator is ``Rz(k 360/N)`` (SPIDER passive
    Rz, i.e. ``rotation_matrix(0, 0, k 360/N)``); for dN the next N are ``diag(1, -1, -1) @ Rz(k 360/N)``, as in
    SPARX. The set is a group: closed under products and transposes.
    """
    return _rotations(*parse_sym(sym)).copy()


def symmetry_mates(poses, sym: str) -> np.ndarray:
    """All symmetry-related poses: mate j of a pose R is ``R @ S_j`` with the same shift.

    poses : array (n, 5) or (5,). Returns float64 (n, k, 5), k the group order, mate 0 the pose itself (angles
    re-normalised by :func:`gpu_ali3d.geometry.euler_from_matrix`). All mates give the same projection of a map
    with this symmetry (module docstring).
    """
    p = _as_poses(poses, "poses", ncols=5)
    ops = _rotations(*parse_sym(sym))
    r = rotation_matrix(p[:, 0], p[:, 1], p[:, 2])
    mates = np.einsum("nij,kjl->nkil", r, ops)
    phi, theta, psi = euler_from_matrix(mates)
    out = np.empty((len(p), len(ops), 5))
    out[..., 0], out[..., 1], out[..., 2] = phi, theta, psi
    out[..., 3:5] = p[:, None, 3:5]
    return out


def angular_distance_sym(poses_a, poses_b, sym: str) -> np.ndarray:
    """Angular distance (degrees, [0, 180]) from each pose of a to the nearest symmetry mate of the pose of b.

    poses_a, poses_b : arrays (n, 5) or (5,); a single pose broadcasts against n. Returns float64 (n,):
    ``min_j angle(R_a @ (R_b @ S_j).T)``. With sym = "c1" it equals :func:`gpu_ali3d.geometry.angular_distance`.
    """
    a, b = _pose_pair(poses_a, poses_b, "poses_a", "poses_b")
    ops = _rotations(*parse_sym(sym))
    ra = rotation_matrix(a[:, 0], a[:, 1], a[:, 2])
    rb = rotation_matrix(b[:, 0], b[:, 1], b[:, 2])
    # trace(R_a S_j^T R_b^T) = sum_il (R_b^T R_a)_il (S_j)_il: the nearest mate has the largest trace
    m = np.einsum("nji,njl->nil", rb, ra)
    best = np.argmax(np.einsum("nil,kil->nk", m, ops), axis=1)
    rel = np.einsum("nij,nlj,nkl->nik", ra, ops[best], rb)     # R_a @ S.T @ R_b.T
    return _rotation_angle_deg(rel)


# ----------------------------------------------------------------------------------------------- construction
@lru_cache(maxsize=None)
def _rotations(kind: str, n: int) -> np.ndarray:
    if kind == "c":
        ops = rotation_matrix(0.0, 0.0, 360.0 * np.arange(n) / n)
    elif kind == "d":
        cn = rotation_matrix(0.0, 0.0, 360.0 * np.arange(n) / n)
        ops = np.concatenate([cn, np.diag([1.0, -1.0, -1.0]) @ cn])
    elif kind == "tet":
        two_fold = np.array([np.sqrt(2.0 / 3.0), 0.0, np.sqrt(1.0 / 3.0)])
        ops = _closure([_axis_rotation([0, 0, 1], 120.0), _axis_rotation(two_fold, 180.0)])
    elif kind == "oct":
        ops = _closure([_axis_rotation([0, 0, 1], 90.0), _axis_rotation([1, 0, 0], 90.0)])
    else:  # icos
        five_fold = np.array([2.0, 0.0, 1.0]) / np.sqrt(5.0)
        ops = _closure([_axis_rotation([0, 0, 1], 72.0), _axis_rotation(five_fold, 72.0)])
    expected = _order(kind, n)
    if len(ops) != expected:  # construction error, not user input
        raise RuntimeError(f"built {len(ops)} operators for {kind}{n}, expected {expected}")
    ops.setflags(write=False)
    return ops


def _order(kind: str, n: int) -> int:
    return n if kind == "c" else 2 * n if kind == "d" else _POLYHEDRAL[kind][1]


def _axis_rotation(axis, angle_deg: float) -> np.ndarray:
    """Right-handed rotation by angle_deg about a unit axis, (3, 3)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    t = np.deg2rad(angle_deg)
    k = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return np.eye(3) + np.sin(t) * k + (1.0 - np.cos(t)) * (k @ k)


def _closure(generators: list[np.ndarray]) -> np.ndarray:
    """The finite group generated by rotation matrices, identity first, in breadth-first order, (k, 3, 3)."""
    group = [np.eye(3)]
    i = 0
    while i < len(group):
        for g in generators:
            cand = group[i] @ g
            if min(np.abs(cand - h).max() for h in group) > 1e-8:
                group.append(cand)
        i += 1
        if len(group) > 60:
            break
    ops = np.array(group)
    # re-orthonormalise away the rounding accumulated over the products
    u, _, vt = np.linalg.svd(ops)
    return u @ vt
