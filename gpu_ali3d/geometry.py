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
    r22 = np.clip(r[..., 2, 2], -1.0, 1.0)
    theta = np.arccos(r22)
    sin_theta = np.hypot(r[..., 2, 0], r[..., 2, 1])
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
