"""The gpu-ali3d command as a new user meets it: convert, info, simulate, refine's option checks, and errors.

User errors must print exactly one line naming the file and the problem, exit with status 2, and leave no
partial output behind.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import mrcfile
import numpy as np
import pytest
import starfile

from gpu_ali3d.cli import main
from gpu_ali3d.geometry import angular_distance, shift_distance
from gpu_ali3d.io.formats import read_stack


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, argv, *fragments) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-ali3d: error: "), err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


@pytest.fixture
def clean_star(shared_data) -> Path:
    return shared_data / "relion_sim" / "clean" / "sim.star"


def test_convert_star_to_hdf_then_info(tmp_path, capsys, clean_star):
    hdf = tmp_path / "x.hdf"
    code, out, err = run_cli(capsys, "convert", clean_star, hdf)
    assert code == 0, err
    code, out, err = run_cli(capsys, "info", hdf, "--check")
    assert code == 0, err
    assert "200 particles" in out and "64 x 64" in out and "4 A/pixel" in out and "CTF: defocus" in out
    assert "all images readable and finite" in out


def test_round_trip_hdf_star_hdf_keeps_poses_ctf_and_images(tmp_path, capsys, shared_data):
    start = shared_data / "relion_sim" / "clean" / "start.star"
    first, star, second = tmp_path / "a.hdf", tmp_path / "b.star", tmp_path / "c.hdf"
    for src, dst in ((start, first), (first, star), (star, second)):
        code, _, err = run_cli(capsys, "convert", src, dst)
        assert code == 0, err
    original, back = read_stack(start), read_stack(second)
    assert len(back) == len(original) == 200
    assert angular_distance(original.poses, back.poses).max() < 1e-4          # degrees
    assert shift_distance(original.poses, back.poses).max() < 1e-4            # pixels
    assert back.ctf.allclose(original.ctf, rtol=1e-6, atol=1e-3)               # defocus in A, float64 strings
    assert back.apix_A == pytest.approx(4.0)
    np.testing.assert_array_equal(back.read_images(slice(0, 20)), original.read_images(slice(0, 20)))
    # the STAR in the middle points at images that exist beside it
    table = starfile.read(star)["particles"]
    ref = table["rlnImageName"].iloc[0]
    index, path = ref.split("@")
    assert (tmp_path / path).is_file() and int(index) == 1


def test_simulate_phantom_star_then_info(tmp_path, capsys):
    out = tmp_path / "sim.star"
    code, stdout, err = run_cli(capsys, "simulate", out, "--n", 12, "--box", 32, "--ctf", "--snr", 1.0, "--seed", 3)
    assert code == 0, err
    truth = tmp_path / "sim_truth.star"
    assert out.is_file() and truth.is_file()
    start_stack, truth_stack = read_stack(out), read_stack(truth)
    np.testing.assert_allclose(angular_distance(start_stack.poses, truth_stack.poses), 4.0, atol=1e-3)
    np.testing.assert_allclose(shift_distance(start_stack.poses, truth_stack.poses), 1.5, atol=1e-3)
    # both tables point at one image file, written once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim.mrcs", "sim.star", "sim_truth.star"]
    code, stdout, err = run_cli(capsys, "info", out)
    assert code == 0 and "12 particles" in stdout


def test_simulate_from_a_map_to_hdf(tmp_path, capsys, shared_data):
    out = tmp_path / "ribo.hdf"
    code, _, err = run_cli(capsys, "simulate", shared_data / "relion_sim" / "ref.mrc", out, "--n", 5, "--seed", 1)
    assert code == 0, err
    stack = read_stack(out)
    assert len(stack) == 5 and stack.box == 64 and stack.apix_A == pytest.approx(4.0)
    assert (tmp_path / "ribo_truth.hdf").is_file()


def test_refine_parses_every_sparx_option(tmp_path, capsys, clean_star):
    # every SPARX option at once; maxit 0 runs the final reconstruction only, so this stays quick
    argv = ["refine", clean_star, tmp_path / "out", "--ou", 28, "--delta", 3, "--ts", 1.5, "--maxit", 0,
            "--chunk", 1, "--center", -1, "--CTF", "--snr", 2, "--sym", "c2", "--function", "ref_ali3d",
            "--npad", 2, "--Fourvar", "--MPI", "--device", "cpu", "--seed", 7, "--interpolation", "trilinear"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "200 particles, box 64" in out and "ou 28" in out and "sym c2" in out
    assert (tmp_path / "out" / "vol000_000.hdf").is_file() and (tmp_path / "out" / "particles.star").is_file()


@pytest.mark.parametrize("args, fragments", [
    (["--ou", 40], ["--ou 40 is larger than a 64-pixel box allows; use --ou <= 31"]),
    (["--sym", "q5"], ["q5"]),
    (["--chunk", 0], ["--chunk 0"]),
])
def test_refine_rejects_bad_options(tmp_path, capsys, clean_star, args, fragments):
    assert_user_error(capsys, ["refine", clean_star, tmp_path / "out", *args], *fragments)


def test_refine_refuses_existing_outdir(tmp_path, capsys, clean_star):
    (tmp_path / "out").mkdir()
    assert_user_error(capsys, ["refine", clean_star, tmp_path / "out"], "already exists")


# ------------------------------------------------------------------------------------------------ bad input
def test_existing_output_is_refused_and_untouched(tmp_path, capsys, clean_star):
    dst = tmp_path / "x.hdf"
    dst.write_bytes(b"precious")
    assert_user_error(capsys, ["convert", clean_star, dst], str(dst), "already exists")
    assert dst.read_bytes() == b"precious"


def test_missing_input(tmp_path, capsys):
    assert_user_error(capsys, ["info", tmp_path / "nope.star"], "nope.star", "no such file")


def test_unknown_format(tmp_path, capsys):
    p = tmp_path / "x.txt"
    p.write_text("hello")
    assert_user_error(capsys, ["info", p], "x.txt", "unknown particle stack format")


def test_bare_mrcs_output_refused(tmp_path, capsys, clean_star):
    assert_user_error(capsys, ["convert", clean_star, tmp_path / "x.mrcs"], "cannot hold poses")
    assert list(tmp_path.iterdir()) == []


def test_star_without_angles(tmp_path, capsys, shared_data):
    src = shared_data / "relion_sim" / "clean"
    shutil.copy(src / "sim.mrcs", tmp_path / "sim.mrcs")
    data = starfile.read(src / "sim.star")
    data["particles"] = data["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    starfile.write(data, tmp_path / "noangles.star")
    assert_user_error(capsys, ["convert", tmp_path / "noangles.star", tmp_path / "x.hdf"], "noangles.star", "angle")
    assert not (tmp_path / "x.hdf").exists()


def test_image_index_past_the_end(tmp_path, capsys, shared_data):
    src = shared_data / "relion_sim" / "clean"
    shutil.copy(src / "sim.mrcs", tmp_path / "sim.mrcs")
    data = starfile.read(src / "sim.star")
    data["particles"].loc[5, "rlnImageName"] = "000201@sim.mrcs"
    starfile.write(data, tmp_path / "bad.star")
    assert_user_error(capsys, ["convert", tmp_path / "bad.star", tmp_path / "x.hdf"], "201", "sim.mrcs")
    assert not (tmp_path / "x.hdf").exists()


def test_truncated_mrcs(tmp_path, capsys, shared_data):
    src = shared_data / "relion_sim" / "clean"
    raw = (src / "sim.mrcs").read_bytes()
    (tmp_path / "sim.mrcs").write_bytes(raw[: len(raw) // 2])
    shutil.copy(src / "sim.star", tmp_path / "sim.star")
    assert_user_error(capsys, ["convert", tmp_path / "sim.star", tmp_path / "x.hdf"], "sim.mrcs")
    assert not (tmp_path / "x.hdf").exists()


def test_truncated_hdf(tmp_path, capsys, clean_star):
    good = tmp_path / "good.hdf"
    assert main(["convert", str(clean_star), str(good)]) == 0
    raw = good.read_bytes()
    (tmp_path / "cut.hdf").write_bytes(raw[: len(raw) // 3])
    capsys.readouterr()
    assert_user_error(capsys, ["convert", tmp_path / "cut.hdf", tmp_path / "x.star"], "cut.hdf")
    assert not (tmp_path / "x.star").exists() and not (tmp_path / "x.mrcs").exists()


@pytest.mark.filterwarnings("ignore:Data array contains NaN:RuntimeWarning")
def test_nan_pixels(tmp_path, capsys, shared_data):
    src = shared_data / "relion_sim" / "clean"
    images = mrcfile.read(src / "sim.mrcs").copy()
    images[7, 10, 10] = np.nan
    with mrcfile.new(tmp_path / "sim.mrcs") as m:
        m.set_data(images)
    shutil.copy(src / "sim.star", tmp_path / "sim.star")
    assert_user_error(capsys, ["convert", tmp_path / "sim.star", tmp_path / "x.hdf"], "sim.mrcs", "NaN")
    assert not (tmp_path / "x.hdf").exists()


def test_hdf_without_xform_projection(tmp_path, capsys, clean_star):
    good = tmp_path / "good.hdf"
    assert main(["convert", str(clean_star), str(good)]) == 0
    with h5py.File(good, "r+") as f:
        del f["MDF/images/3"].attrs["EMAN.xform.projection"]
    capsys.readouterr()
    assert_user_error(capsys, ["convert", good, tmp_path / "x.star"], "good.hdf", "xform.projection")
    assert not (tmp_path / "x.star").exists()


def test_hdf_with_unparsable_ctf(tmp_path, capsys, clean_star):
    good = tmp_path / "good.hdf"
    assert main(["convert", str(clean_star), str(good)]) == 0
    with h5py.File(good, "r+") as f:
        f["MDF/images/2"].attrs["EMAN.ctf"] = np.bytes_(b"Egarbage,1,2")
    capsys.readouterr()
    assert_user_error(capsys, ["convert", good, tmp_path / "x.star"], "good.hdf", "ctf")


def test_non_square_images(tmp_path, capsys):
    with mrcfile.new(tmp_path / "rect.mrcs") as m:
        m.set_data(np.zeros((3, 32, 40), np.float32))
    assert_user_error(capsys, ["info", tmp_path / "rect.mrcs"], "rect.mrcs", "square")


def test_console_script_is_installed(tmp_path, clean_star):
    exe = Path(sys.executable).with_name("gpu-ali3d")
    assert exe.is_file(), "pip install -e . should have created the gpu-ali3d console script"
    res = subprocess.run([str(exe), "info", str(clean_star)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr
    assert "200 particles" in res.stdout
    res = subprocess.run([str(exe), "info", str(tmp_path / "missing.hdf")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "missing.hdf" in res.stderr


# ------------------------------------------------------------------------------- issue 12 (real files)
def test_info_on_image_names_without_at(tmp_path, capsys, shared_data):
    """item 4: a name without '@' is a whole single-image file (RELION); info describes it, no traceback; a
    stack named without '@' is one line naming the file and the row."""
    clean = shared_data / "relion_sim" / "clean"
    table = starfile.read(clean / "sim.star", always_dict=True)
    rng = np.random.default_rng(0)
    for k in range(3):
        with mrcfile.new(tmp_path / f"p{k}.mrc") as mrc:
            mrc.set_data(rng.standard_normal((64, 64)).astype(np.float32))
    parts = table["particles"].iloc[:3].copy()
    parts["rlnImageName"] = [f"p{k}.mrc" for k in range(3)]
    starfile.write({"optics": table["optics"], "particles": parts}, tmp_path / "plain.star")
    code, out, err = run_cli(capsys, "info", tmp_path / "plain.star")
    assert code == 0 and "3 particles, 64 x 64 pixels" in out and "in 3 file(s)" in out, (out, err)
    shutil.copyfile(clean / "sim.mrcs", tmp_path / "sim.mrcs")
    parts["rlnImageName"] = ["p0.mrc", "sim.mrcs", "p2.mrc"]
    starfile.write({"optics": table["optics"], "particles": parts}, tmp_path / "stack.star")
    assert_user_error(capsys, ["info", tmp_path / "stack.star"], "stack.star: particle 2", "'sim.mrcs'",
                      "holds 200 images")


def test_info_on_an_old_header_mrcs(capsys, test_data):
    """item 2: cryoDRGN's pre-2014 header stack is described, not refused."""
    code, out, err = run_cli(capsys, "info", test_data / "cryodrgn" / "hand.5.mrcs")
    assert code == 0 and "5 particles, 64 x 64 pixels" in out and "poses: none" in out, (out, err)


def test_refine_on_a_bare_mrcs_is_refused_at_the_start(tmp_path, capsys, shared_data):
    """item 9: images without poses are refused before any work (no outdir left), naming what to give."""
    assert_user_error(capsys, ["refine", shared_data / "relion_sim" / "clean" / "sim.mrcs", tmp_path / "out",
                               "--maxit", "1"],
                      "sim.mrcs holds images only, no poses", "local refinement needs starting poses", ".star")
    assert not (tmp_path / "out").exists()
