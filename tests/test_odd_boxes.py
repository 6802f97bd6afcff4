"""Odd boxes (issue 12, item 8): `simulate` of an odd map makes even-box particles (RELION extracts even boxes
only), an odd --box is refused, and odd-box particles written to a RELION STAR get one warning line."""
from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile

from gpu_ali3d.cli import main
from gpu_ali3d.io.eman_hdf import write_hdf_stack
from gpu_ali3d.io.formats import read_stack
from gpu_ali3d.io.stack import ArrayImages, ParticleStack
from gpu_ali3d.projection import project
from gpu_ali3d.simulate import even_box


@pytest.fixture(scope="module")
def ribosome65(shared_data) -> np.ndarray:
    vol = mrcfile.read(shared_data / "ribosome70S_65.mrc").astype(np.float64)
    assert vol.shape == (65, 65, 65)
    return vol


def test_even_box_pads_one_plane_before_each_axis_and_keeps_the_centre(ribosome65):
    padded, old = even_box(ribosome65)
    assert old == 65 and padded.shape == (66, 66, 66) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[1:, 1:, 1:], ribosome65.astype(np.float32))   # nothing lost
    faces = np.concatenate([ribosome65[[0, -1]].ravel(), ribosome65[:, [0, -1]].ravel(),
                            ribosome65[:, :, [0, -1]].ravel()])
    assert np.all(padded[0] == np.float32(faces.mean())) and np.all(padded[:, :, 0] == np.float32(faces.mean()))
    # the centre voxel 65 // 2 = 32 is now 66 // 2 = 33: projections are the map's, not a pixel off
    poses = np.array([[0, 0, 0, 0, 0], [30, 60, 100, 0, 0], [200, 120, -50, 0, 0]], dtype=np.float64)
    odd, even = project(ribosome65, poses), project(padded.astype(np.float64), poses)
    for a, b in zip(odd, even):
        assert np.corrcoef(a.ravel(), b[1:, 1:].ravel())[0, 1] > 0.9999      # measured >= 0.99998
        assert np.corrcoef(a.ravel(), b[:-1, :-1].ravel())[0, 1] < 0.95      # a pixel off: 0.83-0.90
    same, box = even_box(np.zeros((8, 8, 8)))
    assert box == 8 and same.shape == (8, 8, 8)


def test_simulate_of_an_odd_map_makes_even_particles_and_says_so(shared_data, tmp_path, capsys):
    out = tmp_path / "sim.star"
    code = main(["simulate", str(shared_data / "ribosome70S_65.mrc"), str(out), "--n", "4", "--seed", "2",
                 "--apix", "4"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "odd (65^3); padded to 66^3" in stdout and "warning" not in err, (stdout, err)
    stack = read_stack(out)
    assert stack.box == 66 and len(stack) == 4
    assert starfile.read(out, always_dict=True)["optics"]["rlnImageSize"].tolist() == [66]
    assert mrcfile.read(tmp_path / "sim.mrcs").shape == (4, 66, 66)


def test_simulate_refuses_an_odd_phantom_box(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "sim.star"), "--box", "33"]) == 2
    err = capsys.readouterr().err
    assert "--box 33: particle boxes are even" in err and "use --box 32 or 34" in err, err
    assert list(tmp_path.iterdir()) == []


def test_odd_box_particles_to_star_warn_once_in_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    stack = ParticleStack(images=ArrayImages(rng.standard_normal((5, 33, 33)).astype(np.float32)),
                          poses=np.zeros((5, 5)), apix_A=2.0)
    write_hdf_stack(stack, tmp_path / "odd.hdf")
    assert main(["convert", str(tmp_path / "odd.hdf"), str(tmp_path / "odd.star")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpu-ali3d: warning: the particles' box is 33 pixels"), err
    assert "RELION" in lines[0]
    assert read_stack(tmp_path / "odd.star").box == 33                     # written all the same
    # the cryoSPARC and HDF writers say nothing
    assert main(["convert", str(tmp_path / "odd.hdf"), str(tmp_path / "cs_odd.cs")]) == 0
    assert capsys.readouterr().err == ""


def test_the_cli_says_each_warning_once(capsys):
    from gpu_ali3d.cli import _one_line_warnings

    show = _one_line_warnings()
    for _ in range(3):                                   # e.g. simulate writes OUT.star and OUT_truth.star
        show(UserWarning("the particles' box is 33 pixels,\n  an odd size"), UserWarning, "x.py", 1)
    show(UserWarning("another"), UserWarning, "x.py", 2)
    assert capsys.readouterr().err.splitlines() == ["gpu-ali3d: warning: the particles' box is 33 pixels, an odd size",
                                                    "gpu-ali3d: warning: another"]
