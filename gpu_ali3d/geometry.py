"""Pose conventions: SPIDER ZYZ Euler angles, rotation matrices, and the other programs' forms of a pose.

The one convention used everywhere inside gpu-ali3d (SPARX's):

* Angles (phi, theta, psi) in degrees, SPIDER ZYZ. The rotation matrix is
  ``R = Rz(psi) @ Ry(theta) @ Rz(phi)`` with the *passive* elementary rotations
  ``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]`` and ``Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]``.
  It equals the transpose of ``scipy.spatial.transform.Rotation.from_euler("ZYZ", [phi, theta, psi],
  degrees=True).as_matrix()`` and RELION's ``Euler_angles2matrix(rot, tilt, psi)``: RELION's (rot, tilt, psi) are
  SPIDER's (phi, theta, psi) unchanged.
* A projection at R samples the map's Fourier transform at ``R.T @ (kx, ky, 0)``; in real space the image is the
  integral along z of ``V(R.T @ r)``. The projection direction in the map's frame is ``R[2]``.
* Shifts (sx, sy) are pixels of the input box, SPARX sign (``get_params_proj``): the image equals the projection
  translated by (-sx, -sy); translating the image by (+sx, +sy) centres it. x is the column index, y the row index
  of a numpy (ny, nx) image. RELION 3.1 ``rlnOriginX/YAngst`` divided by the pixel size are the same numbers
  (proven with ``relion_project`` in tests/test_geometry.py), and an EMAN2 ``xform.projection`` stores
  (tx, ty) = (-sx, -sy) as its translation column.

Poses are carried as float64 arrays of shape (n, 5): phi, theta, psi (degrees), sx, sy (pixels); see POSE_COLUMNS.
"""
from __future__ import annotations

import numpy as np

POSE_COLUMNS = ("phi", "theta", "psi", "sx", "sy")

#: Below this |sin(theta)| the ZYZ decomposition is degenerate (theta = 0 or 180) and phi is set to 0.
_GIMBAL_EPS = 1e-9


def rotation_matrix(phi, theta, psi) -> np.ndarray:
    """SPIDER/SPARX ZYZ Euler angles -> rotation matrices.

    phi, theta, psi : scalars or arrays of one shape S, degrees.
    Returns float64 R of shape S + (3, 3). A projection at these angles samples the reference transform at
    ``R.T @ k`` (module docstring).
    """
    phi, theta, psi = np.broadcast_arrays(*(np.deg2rad(np.asarray(a, dtype=np.float64)) for a in (phi, theta, psi)))
    cf, sf = np.cos(phi), np.sin(phi)
    ct, st = np.cos(theta), np.sin(theta)
    cp, sp = np.cos(psi), np.sin(psi)
    r = np.empty(phi.shape + (3, 3))
    r[..., 0, 0] = cp * ct * cf - sp * sf
    r[..., 0, 1] = cp * ct * sf + sp * cf
    r[..., 0, 2] = -cp * st
    r[..., 1, 0] = -sp * ct * cf - cp * sf
    r[..., 1, 1] = -sp * ct * sf + cp * cf
    r[..., 1, 2] = sp * st
    r[..., 2, 0] = st * cf
    r[..., 2, 1] = st * sf
    r[..., 2, 2] = ct
    return r


def euler_from_matrix(r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotation matrices -> SPIDER ZYZ (phi, theta, psi) in degrees, the inverse of :func:`rotation_matrix`.

    r : array (..., 3, 3). Returns three float64 arrays of shape (...): phi in [0, 360), theta in [0, 180],
    psi in [0, 360). At theta = 0 or 180 (gimbal lock) phi is 0 and the in-plane angle goes to psi.
    """
    r = np.asarray(r, dtype=np.float64)
    r22 = r[..., 2, 2]
    sin_theta = np.hypot(r[..., 2, 0], r[..., 2, 1])
    theta = np.arctan2(sin_theta, r22)  # not arccos(r22): that loses precision near 0 and 180 degrees
    regular = sin_theta > _GIMBAL_EPS
    phi = np.where(regular, np.arctan2(r[..., 2, 1], r[..., 2, 0]), 0.0)
    psi_regular = np.arctan2(r[..., 1, 2], -r[..., 0, 2])
    # theta = 0: R = Rz(psi + phi); theta = 180: R = Rz(psi) diag(-1, 1, -1) Rz(phi). With phi = 0:
    psi_degenerate = np.where(r22 > 0, np.arctan2(r[..., 0, 1], r[..., 0, 0]), np.arctan2(r[..., 0, 1], r[..., 1, 1]))
    psi = np.where(regular, psi_regular, psi_degenerate)
    theta = np.where(regular, theta, np.where(r22 > 0, 0.0, np.pi))
    return np.mod(np.rad2deg(phi), 360.0), np.rad2deg(theta), np.mod(np.rad2deg(psi), 360.0)


def projection_direction(phi, theta) -> np.ndarray:
    """Unit vector (x, y, z) in the map's frame along which a pose at (phi, theta) projects: ``R[2]``."""
    phi, theta = np.deg2rad(np.asarray(phi, float)), np.deg2rad(np.asarray(theta, float))
    return np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], axis=-1)


# ----------------------------------------------------------------------------------------------- other programs
def as_poses(poses, n: int | None = None) -> np.ndarray:
    """Validated float64 poses (n, 5) [phi, theta, psi, sx, sy]; a single pose (5,) becomes (1, 5).

    n : the number of poses required (one per image), or None for any. ValueError for a wrong shape or NaN/inf.
    """
    p = np.asarray(poses, dtype=np.float64)
    if p.shape == (5,):
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 5 or (n is not None and len(p) != n):
        want = f"({n}, 5)" if n is not None else "(n, 5)"
        raise ValueError(f"poses must have shape {want} [{', '.join(POSE_COLUMNS)}]; got {np.shape(poses)}")
    if not np.all(np.isfinite(p)):
        raise ValueError("poses contain NaN or inf")
    return p


def relion_to_spider(rot, tilt, psi, origin_x_A, origin_y_A, apix_A: float) -> np.ndarray:
    """RELION 3.1 pose columns -> gpu-ali3d poses (n, 5).

    rot, tilt, psi : degrees (rlnAngleRot/Tilt/Psi); origin_x_A, origin_y_A : rlnOriginX/YAngst in Angstrom;
    apix_A : pixel size. For RELION 3.0 (rlnOriginX/Y in pixels) pass apix_A=1.
    """
    out = np.empty((np.size(rot), 5))
    out[:, 0], out[:, 1], out[:, 2] = np.ravel(rot), np.ravel(tilt), np.ravel(psi)
    out[:, 3] = np.ravel(origin_x_A) / apix_A
    out[:, 4] = np.ravel(origin_y_A) / apix_A
    return out


def spider_to_relion(poses: np.ndarray, apix_A: float) -> dict[str, np.ndarray]:
    """gpu-ali3d poses (n, 5) -> RELION 3.1 columns (degrees and Angstrom), keyed by their STAR names."""
    poses = np.asarray(poses, dtype=np.float64)
    return {
        "rlnAngleRot": poses[:, 0].copy(),
        "rlnAngleTilt": poses[:, 1].copy(),
        "rlnAnglePsi": poses[:, 2].copy(),
        "rlnOriginXAngst": poses[:, 3] * apix_A,
        "rlnOriginYAngst": poses[:, 4] * apix_A,
    }


def eman_transform_from_spider(poses: np.ndarray) -> np.ndarray:
    """gpu-ali3d poses (n, 5) -> EMAN2 ``xform.projection`` matrices (n, 3, 4) float64.

    The 3x3 part is the SPIDER rotation matrix (EMAN2's Transform of type "spider" has this matrix); the
    translation column is (tx, ty, tz) = (-sx, -sy, 0), as SPARX ``set_params_proj`` stores it.
    """
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 5)
    m = np.zeros((len(poses), 3, 4))
    m[:, :, :3] = rotation_matrix(poses[:, 0], poses[:, 1], poses[:, 2])
    m[:, 0, 3] = -poses[:, 3]
    m[:, 1, 3] = -poses[:, 4]
    return m


def spider_from_eman_transform(m: np.ndarray) -> np.ndarray:
    """EMAN2 ``xform.projection`` matrices (n, 3, 4) -> gpu-ali3d poses (n, 5), as SPARX ``get_params_proj``.

    The rotation part must be orthonormal (checked to 1e-3; EMAN2 stores float32) and the Transform must carry no
    scale or mirror; a ValueError says which matrix is not.
    """
    m = np.asarray(m, dtype=np.float64).reshape(-1, 3, 4)
    rot = m[:, :, :3]
    err = np.abs(np.einsum("nij,nkj->nik", rot, rot) - np.eye(3)).max(axis=(1, 2))
    det = np.linalg.det(rot)
    bad = np.nonzero((err > 1e-3) | (det < 0))[0]
    if len(bad):
        raise ValueError(
            f"xform.projection of image {bad[0]} is not a pure rotation (|R R^T - I| = {err[bad[0]]:.2g}, "
            f"det = {det[bad[0]]:.3f}); scaled or mirrored Transforms are not supported")
    phi, theta, psi = euler_from_matrix(rot)
    return np.stack([phi, theta, psi, -m[:, 0, 3], -m[:, 1, 3]], axis=1)


# ----------------------------------------------------------------------------------------------- distances
def angular_distance(poses_a, poses_b) -> np.ndarray:
    """Angle of the relative rotation ``R_a @ R_b.T`` for each pair of poses, degrees in [0, 180].

    poses_a, poses_b : arrays (n, 5) or (5,) (only phi, theta, psi are read); a single pose broadcasts against n.
    Returns float64 (n,). The angle is ``atan2(sin, cos)`` of the relative rotation, with ``sin`` from its
    antisymmetric part and ``cos`` from its trace, so it keeps full precision at 0 and at 180 degrees.
    No symmetry is applied; see :func:`gpu_ali3d.symmetry.angular_distance_sym`.
    """
    a, b = _pose_pair(poses_a, poses_b, "poses_a", "poses_b")
    ra = rotation_matrix(a[:, 0], a[:, 1], a[:, 2])
    rb = rotation_matrix(b[:, 0], b[:, 1], b[:, 2])
    return _rotation_angle_deg(np.einsum("nij,nkj->nik", ra, rb))


def shift_distance(poses_a, poses_b) -> np.ndarray:
    """Euclidean distance between the in-plane shifts (sx, sy) of each pair of poses, pixels.

    poses_a, poses_b : arrays (n, 5) or (5,); a single pose broadcasts against n. Returns float64 (n,).
    """
    a, b = _pose_pair(poses_a, poses_b, "poses_a", "poses_b", ncols=5)
    return np.hypot(a[:, 3] - b[:, 3], a[:, 4] - b[:, 4])


# ----------------------------------------------------------------------------------------------- cryoSPARC
def spider_from_cryosparc(rotvec_rad, shift_px) -> np.ndarray:
    """cryoSPARC ``alignments3D/pose`` and ``alignments3D/shift`` -> gpu-ali3d poses (n, 5).

    rotvec_rad : array (n, 3), the rotation vector r (axis times angle, radians) of ``alignments3D/pose``.
    shift_px : array (n, 2), ``alignments3D/shift`` in pixels of the particle box.

    Convention. The matrix that cryoSPARC builds from r is the *transpose* of the standard (right-handed, active)
    Rodrigues matrix ``A(r) = expm([r]_x)`` = ``scipy Rotation.from_rotvec(r).as_matrix()``; that matrix is the
    RELION (= SPIDER) rotation matrix of the pose: ``R = A(r).T = A(-r)``. The shift is the same pair of numbers as
    RELION's rlnOriginX/Y in pixels, i.e. our (sx, sy) with no sign change.
    Sources: pyem (github asarnow/pyem), ``pyem/metadata/cryosparc2.py`` ``parse_cryosparc_2_cs`` and
    ``cryosparc_2_cs_model_parameters``: ``alignments3D/shift`` goes unchanged into rlnOriginX/Y, and the pose
    goes through ``pyem/geom/convert_numba.py`` ``expmap`` (the transposed Rodrigues matrix; contributed by
    cryoSPARC's author, pyem PR #5) and ``rot2euler`` (RELION's ZYZ decomposition). cryoDRGN
    (ml-struct-bio/cryodrgn) ``commands/parse_pose_csparc.py`` agrees independently: standard ``lie_tools.expmap``
    followed by a transpose gives the same matrix as its RELION parser ``parse_pose_star`` (``utils.R_from_relion``),
    and both take the shifts unchanged.
    """
    rotvec = np.asarray(rotvec_rad, dtype=np.float64)
    shift = np.asarray(shift_px, dtype=np.float64)
    if rotvec.ndim != 2 or rotvec.shape[1] != 3:
        raise ValueError(f"rotvec_rad has shape {rotvec.shape}; expected (n, 3) rotation vectors in radians")
    if shift.shape != (len(rotvec), 2):
        raise ValueError(f"shift_px has shape {shift.shape}; expected ({len(rotvec)}, 2) to match rotvec_rad")
    r = np.swapaxes(_rodrigues(rotvec), -1, -2)
    phi, theta, psi = euler_from_matrix(r)
    return np.stack([phi, theta, psi, shift[:, 0], shift[:, 1]], axis=1)


def cryosparc_from_spider(poses) -> tuple[np.ndarray, np.ndarray]:
    """gpu-ali3d poses (n, 5) -> (rotvec_rad (n, 3), shift_px (n, 2)) for cryoSPARC ``alignments3D/pose``/``shift``.

    The inverse of :func:`spider_from_cryosparc` (convention and sources there): r is the rotation vector of
    ``R.T``, with angle |r| in [0, pi]; the shift is (sx, sy) unchanged.
    """
    p = _as_poses(poses, "poses", ncols=5)
    r = rotation_matrix(p[:, 0], p[:, 1], p[:, 2])
    return _rotvec_from_matrix(np.swapaxes(r, -1, -2)), p[:, 3:5].copy()


# ----------------------------------------------------------------------------------------------- helpers
def _as_poses(poses, name: str, ncols: int = 3) -> np.ndarray:
    """Pose array -> float64 (n, c) with c >= ncols; a single pose (c,) becomes (1, c)."""
    p = np.asarray(poses, dtype=np.float64)
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] < ncols:
        raise ValueError(f"{name} has shape {np.shape(poses)}; expected (n, 5) poses [phi, theta, psi, sx, sy]")
    return p


def _pose_pair(poses_a, poses_b, name_a: str, name_b: str, ncols: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Two pose arrays broadcast to a common length n (a length-1 array broadcasts)."""
    a, b = _as_poses(poses_a, name_a, ncols), _as_poses(poses_b, name_b, ncols)
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        raise ValueError(f"{name_a} has {len(a)} poses and {name_b} has {len(b)}; give the same number, or one pose")
    n = max(len(a), len(b))
    return np.broadcast_to(a, (n, a.shape[1])), np.broadcast_to(b, (n, b.shape[1]))


def _rotation_angle_deg(m: np.ndarray) -> np.ndarray:
    """Rotation angle (degrees, [0, 180]) of rotation matrices (..., 3, 3), accurate at 0 and 180."""
    vee = np.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], axis=-1)
    sin = 0.5 * np.linalg.norm(vee, axis=-1)
    cos = 0.5 * (np.trace(m, axis1=-2, axis2=-1) - 1.0)
    return np.rad2deg(np.arctan2(sin, cos))


def _rodrigues(rotvec: np.ndarray) -> np.ndarray:
    """Rotation vectors (n, 3) -> the standard (active, right-handed) rotation matrices exp([r]_x), (n, 3, 3)."""
    angle = np.linalg.norm(rotvec, axis=-1)
    a = np.sinc(angle / np.pi)                       # sin(t)/t, exact at t = 0
    b = 0.5 * np.sinc(angle / (2.0 * np.pi)) ** 2    # (1 - cos t)/t^2
    x, y, z = rotvec[:, 0], rotvec[:, 1], rotvec[:, 2]
    zero = np.zeros_like(x)
    k = np.stack([np.stack([zero, -z, y], -1), np.stack([z, zero, -x], -1), np.stack([-y, x, zero], -1)], axis=-2)
    return np.eye(3) + a[:, None, None] * k + b[:, None, None] * (k @ k)


def _rotvec_from_matrix(m: np.ndarray) -> np.ndarray:
    """Standard (active) rotation matrices (n, 3, 3) -> rotation vectors (n, 3) with angle in [0, pi].

    Through the unit quaternion (Shepperd's choice of the largest component), so it stays accurate near 0 and pi.
    """
    tr = np.trace(m, axis1=-2, axis2=-1)
    d0, d1, d2 = m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]
    # 4 * (w^2, x^2, y^2, z^2); pick the largest to divide by
    cand = np.stack([1.0 + tr, 1.0 + 2 * d0 - tr, 1.0 + 2 * d1 - tr, 1.0 + 2 * d2 - tr], axis=-1)
    pick = np.argmax(cand, axis=-1)
    big = 0.5 * np.sqrt(np.take_along_axis(cand, pick[:, None], axis=-1)[:, 0])   # the largest |component|
    s = 0.25 / big
    a21, a12 = m[:, 2, 1], m[:, 1, 2]
    a02, a20 = m[:, 0, 2], m[:, 2, 0]
    a10, a01 = m[:, 1, 0], m[:, 0, 1]
    q = np.empty((len(m), 4))                       # (w, x, y, z)
    rows = [
        (big, (a21 - a12) * s, (a02 - a20) * s, (a10 - a01) * s),
        ((a21 - a12) * s, big, (a10 + a01) * s, (a02 + a20) * s),
        ((a02 - a20) * s, (a10 + a01) * s, big, (a21 + a12) * s),
        ((a10 - a01) * s, (a02 + a20) * s, (a21 + a12) * s, big),
    ]
    for i, row in enumerate(rows):
        sel = pick == i
        for j in range(4):
            q[sel, j] = row[j][sel]
    q[q[:, 0] < 0] *= -1.0                          # w >= 0: angle in [0, pi]
    vnorm = np.linalg.norm(q[:, 1:], axis=-1)
    angle = 2.0 * np.arctan2(vnorm, q[:, 0])
    scale = np.where(vnorm > 0, angle / np.where(vnorm > 0, vnorm, 1.0), 2.0 / q[:, 0])
    return q[:, 1:] * scale[:, None]
