"""Pose conventions (gpu_ali3d.geometry): Euler angles, RELION / EMAN2 / cryoSPARC forms, distances."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from gpu_ali3d.geometry import (
    angular_distance,
    cryosparc_from_spider,
    eman_transform_from_spider,
    euler_from_matrix,
    projection_direction,
    relion_to_spider,
    rotation_matrix,
    shift_distance,
    spider_from_cryosparc,
    spider_from_eman_transform,
    spider_to_relion,
)


def _random_poses(rng, n):
    return np.stack([rng.uniform(-180, 360, n), rng.uniform(0, 180, n), rng.uniform(-180, 360, n),
                     rng.normal(0, 3, n), rng.normal(0, 3, n)], axis=1)


def _matrices(poses):
    poses = np.atleast_2d(poses)
    return rotation_matrix(poses[:, 0], poses[:, 1], poses[:, 2])


def _pose_from_matrix(r):
    phi, theta, psi = euler_from_matrix(r)
    return np.stack([phi, theta, psi, np.zeros_like(phi), np.zeros_like(phi)], axis=-1)


# ----------------------------------------------------------------------------------------------- Euler angles
def test_rotation_matrix_matches_scipy_zyz_transposed(rng):
    poses = _random_poses(rng, 200)
    expected = Rotation.from_euler("ZYZ", poses[:, :3], degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(_matrices(poses), expected, rtol=0, atol=1e-14)


def test_rotation_matrix_broadcasts_scalars():
    r = rotation_matrix(10.0, 20.0, 30.0)
    assert r.shape == (3, 3)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-15)
    assert np.isclose(np.linalg.det(r), 1.0)


def test_euler_round_trip_regular(rng):
    phi, theta, psi = rng.uniform(0, 360, 500), rng.uniform(0.01, 179.99, 500), rng.uniform(0, 360, 500)
    phi2, theta2, psi2 = euler_from_matrix(rotation_matrix(phi, theta, psi))
    for a, b in ((phi, phi2), (psi, psi2)):
        assert np.abs((a - b + 180.0) % 360.0 - 180.0).max() < 1e-9
    np.testing.assert_allclose(theta2, theta, atol=1e-9)
    assert phi2.min() >= 0 and phi2.max() < 360 and psi2.min() >= 0 and psi2.max() < 360


@pytest.mark.parametrize("theta", [0.0, 180.0, 1e-12, 180.0 - 1e-12, 1e-7, 180.0 - 1e-7, 1e-4, 179.9999])
def test_euler_round_trip_at_and_near_gimbal_lock(rng, theta):
    # At theta = 0 or 180 only phi + psi (or psi - phi) is defined, so compare matrices, not angles.
    phi, psi = rng.uniform(0, 360, 50), rng.uniform(0, 360, 50)
    r = rotation_matrix(phi, theta, psi)
    phi2, theta2, psi2 = euler_from_matrix(r)
    np.testing.assert_allclose(rotation_matrix(phi2, theta2, psi2), r, rtol=0, atol=1e-8)
    assert np.all((theta2 >= 0) & (theta2 <= 180))
    if theta in (0.0, 180.0):
        assert np.all(phi2 == 0.0) and np.all(theta2 == theta)


def test_projection_direction_is_third_row(rng):
    poses = _random_poses(rng, 100)
    d = projection_direction(poses[:, 0], poses[:, 1])
    np.testing.assert_allclose(d, _matrices(poses)[:, 2], atol=1e-15)


# ----------------------------------------------------------------------------------------------- RELION
def test_relion_spider_round_trip_on_start_star(shared_data):
    starfile = pytest.importorskip("starfile")
    star = starfile.read(shared_data / "relion_sim" / "clean" / "start.star", always_dict=True)
    particles, optics = star["particles"], star["optics"]
    apix = float(optics["rlnImagePixelSize"].iloc[0])
    poses = relion_to_spider(particles["rlnAngleRot"], particles["rlnAngleTilt"], particles["rlnAnglePsi"],
                             particles["rlnOriginXAngst"], particles["rlnOriginYAngst"], apix)
    assert poses.shape == (len(particles), 5) and poses.dtype == np.float64
    # RELION (rot, tilt, psi) are SPIDER (phi, theta, psi) unchanged: exact
    np.testing.assert_array_equal(poses[:, 0], particles["rlnAngleRot"].to_numpy())
    np.testing.assert_array_equal(poses[:, 1], particles["rlnAngleTilt"].to_numpy())
    np.testing.assert_array_equal(poses[:, 2], particles["rlnAnglePsi"].to_numpy())
    np.testing.assert_allclose(poses[:, 3], particles["rlnOriginXAngst"].to_numpy() / apix, rtol=1e-15)
    np.testing.assert_allclose(poses[:, 4], particles["rlnOriginYAngst"].to_numpy() / apix, rtol=1e-15)
    back = spider_to_relion(poses, apix)
    for name in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        np.testing.assert_array_equal(back[name], particles[name].to_numpy())
    for name in ("rlnOriginXAngst", "rlnOriginYAngst"):
        np.testing.assert_allclose(back[name], particles[name].to_numpy(), rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------------------------- EMAN2
def test_eman_transform_round_trip_and_shift_sign(rng):
    poses = _random_poses(rng, 100)
    poses[:, 1] = rng.uniform(1, 179, 100)           # away from gimbal lock so the angles compare directly
    m = eman_transform_from_spider(poses)
    assert m.shape == (100, 3, 4)
    np.testing.assert_allclose(m[:, :, :3], _matrices(poses), atol=1e-15)
    np.testing.assert_array_equal(m[:, 0, 3], -poses[:, 3])     # tx = -sx (SPARX set_params_proj)
    np.testing.assert_array_equal(m[:, 1, 3], -poses[:, 4])     # ty = -sy
    np.testing.assert_array_equal(m[:, 2, 3], 0.0)
    back = spider_from_eman_transform(m)
    np.testing.assert_allclose(back[:, 3:], poses[:, 3:], atol=1e-14)
    assert angular_distance(back, poses).max() < 1e-9
    np.testing.assert_allclose(back[:, 1], poses[:, 1], atol=1e-9)


def test_eman_transform_float32_is_accepted(rng):
    poses = _random_poses(rng, 20)
    m = eman_transform_from_spider(poses).astype(np.float32)
    back = spider_from_eman_transform(m)
    assert angular_distance(back, poses).max() < 1e-3


@pytest.mark.parametrize("bad", ["scaled", "mirrored"])
def test_eman_transform_rejects_scale_and_mirror(rng, bad):
    m = eman_transform_from_spider(_random_poses(rng, 4))
    if bad == "scaled":
        m[2, :, :3] *= 1.5
    else:
        m[2, :, :3] = m[2, :, :3] @ np.diag([-1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="image 2"):
        spider_from_eman_transform(m)


# ----------------------------------------------------------------------------------------------- distances
@pytest.mark.parametrize("angle", [0.0, 1e-9, 1e-6, 0.5, 37.0, 90.0, 150.0, 179.5, 179.999999, 180.0])
@pytest.mark.parametrize("axis", [(0, 0, 1), (0, 1, 0), (1, 0, 0), (0.3, -0.5, 0.81)])
def test_angular_distance_of_known_rotation(rng, axis, angle):
    """Pose a = (rotation by `angle` about `axis`) applied after pose b: the distance is `angle`."""
    base = _random_poses(rng, 5)
    base[:, 1] = rng.uniform(5, 175, 5)
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    turn = Rotation.from_rotvec(np.deg2rad(angle) * axis).as_matrix()
    moved = _pose_from_matrix(turn @ _matrices(base))
    d = angular_distance(moved, base)
    # Poses pass through Euler angles in degrees: rounding ~1e-13 deg. Near 180 the distance is still exact.
    np.testing.assert_allclose(d, angle, rtol=0, atol=1e-9)
    np.testing.assert_allclose(angular_distance(base, moved), d, rtol=0, atol=1e-12)


def test_angular_distance_simple_cases():
    ident = np.zeros(5)
    cases = [((0, 0, 30, 0, 0), 30.0), ((30, 0, 0, 0, 0), 30.0), ((10, 0, 20, 0, 0), 30.0),
             ((0, 40, 0, 0, 0), 40.0), ((0, 180, 0, 0, 0), 180.0), ((0, 0, 180, 0, 0), 180.0),
             ((90, 180, 90, 0, 0), 180.0), ((0, 0, 360, 0, 0), 0.0), ((0, 0, -90, 0, 0), 90.0)]
    poses = np.array([c[0] for c in cases], float)
    np.testing.assert_allclose(angular_distance(poses, ident), [c[1] for c in cases], atol=1e-12)


def test_angular_distance_identical_and_symmetric(rng):
    a, b = _random_poses(rng, 300), _random_poses(rng, 300)
    assert np.abs(angular_distance(a, a)).max() < 1e-12
    np.testing.assert_allclose(angular_distance(a, b), angular_distance(b, a), rtol=0, atol=1e-12)
    d = angular_distance(a, b)
    assert d.shape == (300,) and d.min() >= 0 and d.max() <= 180
    # agrees with scipy's magnitude of the relative rotation
    rel = Rotation.from_matrix(np.einsum("nij,nkj->nik", _matrices(a), _matrices(b)))
    np.testing.assert_allclose(d, np.rad2deg(rel.magnitude()), atol=1e-9)
    # a single pose broadcasts
    np.testing.assert_allclose(angular_distance(a[0], b), angular_distance(np.repeat(a[:1], 300, 0), b))


def test_distances_reject_mismatched_lengths(rng):
    with pytest.raises(ValueError, match="same number"):
        angular_distance(_random_poses(rng, 3), _random_poses(rng, 4))
    with pytest.raises(ValueError, match=r"\(n, 5\)"):
        shift_distance(np.zeros((3, 3)), np.zeros((3, 5)))


def test_shift_distance():
    a = np.array([[0, 0, 0, 1.0, 2.0], [10, 20, 30, -1.0, 0.5]])
    b = np.array([[5, 5, 5, 4.0, 6.0], [0, 0, 0, -1.0, 0.5]])
    np.testing.assert_allclose(shift_distance(a, b), [5.0, 0.0])


# ----------------------------------------------------------------------------------------------- cryoSPARC
def test_cryosparc_round_trip(rng):
    poses = _random_poses(rng, 500)
    rotvec, shift = cryosparc_from_spider(poses)
    assert rotvec.shape == (500, 3) and shift.shape == (500, 2)
    assert np.linalg.norm(rotvec, axis=1).max() <= np.pi + 1e-12
    np.testing.assert_array_equal(shift, poses[:, 3:])      # shift: same numbers as (sx, sy)
    back = spider_from_cryosparc(rotvec, shift)
    assert angular_distance(back, poses).max() < 1e-9
    np.testing.assert_array_equal(back[:, 3:], poses[:, 3:])
    # and from the cryoSPARC side, including tiny angles and angles close to pi
    rv = Rotation.random(300, random_state=7).as_rotvec()
    rv[:3] = [[1e-12, 0, 0], [0, 0, 0], [0, 1e-7, -2e-7]]
    rv[3] = np.array([0.2, -0.3, 0.9]) / np.linalg.norm([0.2, -0.3, 0.9]) * (np.pi - 1e-9)
    rv2, _ = cryosparc_from_spider(spider_from_cryosparc(rv, np.zeros((300, 2))))
    np.testing.assert_allclose(rv2, rv, rtol=0, atol=1e-9)


def test_cryosparc_convention_against_scipy(rng):
    """cryoSPARC's pose matrix is the transpose of scipy's Rodrigues matrix of `alignments3D/pose`.

    Source: pyem (asarnow/pyem) csparc2star -> pyem/metadata/cryosparc2.py parse_cryosparc_2_cs converts the pose
    with pyem/geom/convert_numba.py expmap (exp of the rotation vector with the transposed cross-product matrix,
    i.e. from_rotvec(r).as_matrix().T) and rot2euler (RELION's ZYZ decomposition), and copies alignments3D/shift
    into rlnOriginX/Y (pixels) unchanged. cryoDRGN parse_pose_csparc (standard expmap, then transpose) agrees.
    RELION's matrix is ours (gpu_ali3d.geometry), so R_ours == from_rotvec(r).as_matrix().T.
    """
    rotvec = Rotation.random(200, random_state=3).as_rotvec()
    shift = rng.normal(0, 4, (200, 2))
    poses = spider_from_cryosparc(rotvec, shift)
    expected = Rotation.from_rotvec(rotvec).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(_matrices(poses), expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(poses[:, 3:], shift)       # rlnOriginX/Y (px) == alignments3D/shift == (sx, sy)
    # a rotation vector along z by a radians is the in-plane angle: SPIDER (0, 0, a) in degrees
    a = 0.3
    p = spider_from_cryosparc([[0.0, 0.0, a]], [[0.0, 0.0]])
    np.testing.assert_allclose(_matrices(p)[0], rotation_matrix(0.0, 0.0, np.rad2deg(a)), atol=1e-15)


def test_cryosparc_rejects_bad_shapes():
    with pytest.raises(ValueError, match="rotvec_rad"):
        spider_from_cryosparc(np.zeros((3, 4)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="shift_px"):
        spider_from_cryosparc(np.zeros((3, 3)), np.zeros((2, 2)))
