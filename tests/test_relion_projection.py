"""The projector, the pose convention, the CTF and the shift sign against images made by RELION 3.1 itself.

RELION's `relion_project` made ../shared/data/relion_sim/clean/sim.mrcs (200 images, origins 0, CTF, SNR 1000) and
tests/data/relion_shifted/shifted.mrcs (8 images, non-zero origins, CTF, no noise) from ref.mrc. Our exact
projector at the poses of the STAR files, read with `geometry.relion_to_spider` and `ctf.from_relion`, must reproduce
every image; the same images at a wrong convention must not match, which shows the test can fail.
"""
from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile

from gpu_ali3d import geometry
from gpu_ali3d.ctf import from_relion
from gpu_ali3d.projection import project, shift_images

#: Agreement required per image. RELION interpolates a padded map trilinearly and the clean set carries noise at
#: SNR 1000; measured min 0.9961 (clean) and 0.9994 (shifted).
GOOD = 0.99
#: A wrong convention must fall clearly below this.
BAD = 0.9


def _read_relion(star_path):
    """(poses (n, 5) in our convention, CTFParams, apix_A) from a RELION 3.1 STAR file with an optics table."""
    star = starfile.read(star_path)
    parts, optics = star["particles"], star["optics"]
    assert len(optics) == 1
    apix = float(optics["rlnImagePixelSize"].iloc[0])
    poses = geometry.relion_to_spider(parts["rlnAngleRot"], parts["rlnAngleTilt"], parts["rlnAnglePsi"],
                                      parts["rlnOriginXAngst"], parts["rlnOriginYAngst"], apix)
    ctf = from_relion(parts["rlnDefocusU"], parts["rlnDefocusV"], parts["rlnDefocusAngle"],
                      float(optics["rlnVoltage"].iloc[0]), float(optics["rlnSphericalAberration"].iloc[0]),
                      float(optics["rlnAmplitudeContrast"].iloc[0]))
    return poses, ctf, apix


def _corr(a, b):
    """Pearson correlation per image of two stacks (n, M, M)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


@pytest.fixture(scope="module")
def ref_map(shared_data):
    return mrcfile.read(shared_data / "relion_sim" / "ref.mrc").astype(np.float64)


@pytest.fixture(scope="module")
def clean(shared_data, ref_map):
    """RELION's clean images, the poses and CTFs they were made with, and our projections at those poses."""
    folder = shared_data / "relion_sim" / "clean"
    poses, ctf, apix = _read_relion(folder / "sim.star")
    images = mrcfile.read(folder / "sim.mrcs").astype(np.float64)
    assert apix == 4.0 and images.shape == (len(poses), 64, 64) and np.all(poses[:, 3:] == 0)
    ours = project(ref_map, poses, ctf=ctf, apix_A=apix)
    return poses, ctf, apix, images, ours


def test_projection_matches_relion_for_every_image(clean):
    *_, images, ours = clean
    c = _corr(ours, images)
    assert c.min() > GOOD, f"min correlation {c.min():.4f} (median {np.median(c):.4f}) at image {c.argmin() + 1}"


def test_wrong_conventions_do_not_match(clean, ref_map):
    """The comparison can fail: a transposed rotation, the map's axes reversed, a mirrored image, or no CTF."""
    poses, ctf, apix, images, _ = clean
    rot = geometry.rotation_matrix(poses[:, 0], poses[:, 1], poses[:, 2])
    transposed = poses.copy()
    transposed[:, 0], transposed[:, 1], transposed[:, 2] = geometry.euler_from_matrix(np.swapaxes(rot, 1, 2))
    wrong = {
        "transposed rotation": project(ref_map, transposed, ctf=ctf, apix_A=apix),
        "map axes (x, y, z) order": project(np.ascontiguousarray(ref_map.transpose(2, 1, 0)), poses, ctf=ctf,
                                            apix_A=apix),
        "image mirrored (y up)": project(ref_map, poses, ctf=ctf, apix_A=apix)[:, ::-1, :],
    }
    for name, stack in wrong.items():
        c = _corr(stack, images)
        # Poses near the symmetric cases (e.g. tilt near 0 for the transposed rotation) can still match.
        assert np.mean(c < BAD) > 0.8, f"{name}: median correlation {np.median(c):.3f}"
    no_ctf = _corr(project(ref_map, poses, apix_A=apix), images)
    assert no_ctf.max() < BAD, (
        f"CTF off: median {np.median(no_ctf):.3f}, max {no_ctf.max():.3f}")


def test_relion_origin_sign(test_data, ref_map):
    """RELION projected these 8 poses with non-zero origins: origin / apix is our (sx, sy), sign included."""
    folder = test_data / "relion_shifted"
    poses, ctf, apix = _read_relion(folder / "shifted.star")
    images = mrcfile.read(folder / "shifted.mrcs").astype(np.float64)
    assert np.all(np.hypot(poses[:, 3], poses[:, 4]) > 1.0)
    c = _corr(project(ref_map, poses, ctf=ctf, apix_A=apix), images)
    assert c.min() > GOOD, f"min correlation {c.min():.4f} with the origins as (sx, sy)"
    for name, change in (("flipped", [-1, -1]), ("x flipped", [-1, 1]), ("y flipped", [1, -1])):
        wrong = poses.copy()
        wrong[:, 3:] *= change
        moved = np.abs(wrong[:, 3:] - poses[:, 3:]).max(axis=1) > 1.0            # images this change affects
        c_wrong = _corr(project(ref_map, wrong, ctf=ctf, apix_A=apix), images)
        assert np.all(c_wrong[moved] < BAD), f"shift sign {name}: correlations {np.round(c_wrong[moved], 3)}"


def test_start_shifts_move_the_image(shared_data, clean, ref_map):
    """start.star's 1.5-pixel offsets are real pixel translations in our sign convention.

    The clean images have zero true shifts, so projecting at the true angles with start.star's shifts must agree
    worse than with zero shifts; and because an image at shift s is the projection translated by -s, translating
    RELION's image by -s with shift_images (equivalently, centring the projection at s by +s) must restore the
    agreement. This ties shift_images, the projector's shift phase and RELION's origin units (Angstrom / apix) to
    one convention.
    """
    poses, ctf, apix, images, ours = clean
    start, _, _ = _read_relion(shared_data / "relion_sim" / "clean" / "start.star")
    np.testing.assert_allclose(np.hypot(start[:, 3], start[:, 4]), 1.5, atol=1e-6)
    at_start = poses.copy()
    at_start[:, 3:] = start[:, 3:]
    projected = project(ref_map, at_start, ctf=ctf, apix_A=apix)
    c_zero = _corr(ours, images)
    c_start = _corr(projected, images)
    assert np.all(c_start < c_zero - 0.05), f"worst drop {np.min(c_zero - c_start):.3f}"
    restored = _corr(projected, shift_images(images, -start[:, 3:]))
    assert restored.min() > GOOD, f"min correlation after translating RELION's images: {restored.min():.4f}"
    centred = _corr(shift_images(projected, start[:, 3:]), images)
    assert centred.min() > GOOD, f"min correlation after centring the projections: {centred.min():.4f}"
    wrong_way = _corr(projected, shift_images(images, start[:, 3:]))
    assert np.median(wrong_way) < np.median(c_start), "translating by +s should make it worse, not better"
