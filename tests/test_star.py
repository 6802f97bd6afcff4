"""RELION STAR files: the RELION-made simulation sets, 3.1 and 3.0 round trips, and every bad input."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from gpu_ali3d.geometry import angular_distance
from gpu_ali3d.io.mrc import MrcStackImages
from gpu_ali3d.io.stack import ArrayImages, ParticleStack
from gpu_ali3d.io import star as star_module
from gpu_ali3d.io.star import OPTICS_PREFIX, is_star, read_star, write_star

ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]


@pytest.fixture
def clean(shared_data) -> Path:
    return shared_data / "relion_sim" / "clean"


@pytest.fixture
def local_copy(tmp_path, clean) -> Path:
    """start.star and sim.mrcs copied into tmp_path/data (so tests may damage them)."""
    d = tmp_path / "data"
    d.mkdir()
    shutil.copyfile(clean / "sim.mrcs", d / "sim.mrcs")
    shutil.copyfile(clean / "start.star", d / "start.star")
    return d


def _edit_star(src: Path, dst: Path, fn) -> Path:
    """Write dst = src with its particle table changed by fn(DataFrame) -> DataFrame."""
    blocks = starfile.read(src, always_dict=True)
    blocks["particles"] = fn(blocks["particles"].copy())
    starfile.write(blocks, dst)
    return dst


def _assert_same(a: ParticleStack, b: ParticleStack, *, meta=True):
    assert len(a) == len(b) and a.box == b.box and a.apix_A == pytest.approx(b.apix_A)
    # angles and shifts: written with 12 significant digits
    assert angular_distance(a.poses, b.poses).max() < 1e-4
    np.testing.assert_allclose(a.poses[:, 3:], b.poses[:, 3:], atol=1e-4)
    assert (a.ctf is None) == (b.ctf is None)
    if a.ctf is not None:
        assert a.ctf.allclose(b.ctf, rtol=1e-9, atol=1e-6)
    if meta:
        assert a.meta.keys() == b.meta.keys()
        for k in a.meta:
            np.testing.assert_array_equal(a.meta[k], b.meta[k], err_msg=k)
    idx = np.unique([0, min(17, len(a) - 1), len(a) - 1])
    np.testing.assert_array_equal(a.read_images(idx), b.read_images(idx))


# ------------------------------------------------------------------------------------------- the RELION files
@pytest.mark.parametrize("name", ["sim.star", "start.star", "truth.star"])
def test_read_relion_sim(clean, name):
    stack = read_star(clean / name)
    table = starfile.read(clean / name, always_dict=True)["particles"]
    assert (len(stack), stack.box, stack.apix_A) == (200, 64, 4.0)
    np.testing.assert_array_equal(stack.poses[:, :3], table[ANGLES].to_numpy())
    np.testing.assert_allclose(stack.poses[:, 3], table["rlnOriginXAngst"].to_numpy() / 4.0, rtol=1e-15)
    np.testing.assert_allclose(stack.poses[:, 4], table["rlnOriginYAngst"].to_numpy() / 4.0, rtol=1e-15)
    if name == "start.star":
        assert np.abs(stack.poses[:, 3:]).max() > 1.0  # the perturbed start has real shifts
    ctf = stack.ctf
    np.testing.assert_array_equal(ctf.defocus_u_A, table["rlnDefocusU"])
    np.testing.assert_array_equal(ctf.defocus_v_A, table["rlnDefocusV"])
    np.testing.assert_array_equal(ctf.astig_angle_deg, table["rlnDefocusAngle"])
    assert np.all(ctf.voltage_kV == 300.0) and np.all(ctf.cs_mm == 2.7) and np.all(ctf.amp_contrast == 0.1)
    assert np.all(ctf.bfactor_A2 == 0.0)
    assert stack.image_refs == list(table["rlnImageName"])
    np.testing.assert_array_equal(stack.meta["rlnRandomSubset"], table["rlnRandomSubset"])
    assert stack.meta[OPTICS_PREFIX + "rlnOpticsGroupName"][0] == "opticsGroup1"
    np.testing.assert_array_equal(stack.read_images(), mrcfile.read(clean / "sim.mrcs"))


def test_is_star(clean, tmp_path):
    assert is_star(clean / "sim.star") and is_star(tmp_path / "new.star")
    assert not is_star(clean / "sim.mrcs") and not is_star(tmp_path / "x.hdf")
    renamed = tmp_path / "particles.txt"
    shutil.copyfile(clean / "sim.star", renamed)
    assert is_star(renamed)


# ---------------------------------------------------------------------------------------------- round trips
def test_round_trip_31_references_images(clean, tmp_path, monkeypatch):
    """Image paths are written as RELION reads them: relative to the current folder (the project folder) for a
    stack inside it, absolute for one outside it; never relative to the STAR file's own folder."""
    outside = write_star(read_star(clean / "start.star"), tmp_path / "outside.star")
    assert {ref.split("@")[1] for ref in starfile.read(outside)["particles"]["rlnImageName"]} == \
        {(clean / "sim.mrcs").as_posix()}
    project = tmp_path / "project"
    project.mkdir()
    shutil.copyfile(clean / "sim.mrcs", project / "sim.mrcs")
    (project / "sim.star").write_text((clean / "start.star").read_text())
    monkeypatch.chdir(project)
    stack = read_star("sim.star")
    out_dir = project / "refine" / "job001"
    out_dir.mkdir(parents=True)
    out = write_star(stack, out_dir / "particles.star")
    assert sorted(p.name for p in out_dir.iterdir()) == ["particles.star"]  # images referenced, not copied
    blocks = starfile.read(out, always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    assert blocks["optics"]["rlnImagePixelSize"].tolist() == [4.0]
    assert blocks["optics"]["rlnImageSize"].tolist() == [64]
    assert {ref.split("@")[1] for ref in blocks["particles"]["rlnImageName"]} == {"sim.mrcs"}   # cwd-relative
    back = read_star(out)
    _assert_same(stack, back)
    assert back.image_refs[5] == "000006@sim.mrcs"


def test_round_trip_30(clean, tmp_path):
    stack = read_star(clean / "start.star")
    out = write_star(stack, tmp_path / "p30.star", version="3.0")
    blocks = starfile.read(out, always_dict=True)
    assert len(blocks) == 1
    table = next(iter(blocks.values()))
    assert "rlnOriginXAngst" not in table and "rlnOpticsGroup" not in table
    np.testing.assert_allclose(table["rlnOriginX"], stack.poses[:, 3], atol=1e-9)  # pixels in 3.0
    np.testing.assert_allclose(table["rlnDetectorPixelSize"] * 1e4 / table["rlnMagnification"], 4.0)
    back = read_star(out)
    _assert_same(stack, back, meta=False)  # 3.0 has no optics table to keep
    np.testing.assert_array_equal(back.meta["rlnRandomSubset"], stack.meta["rlnRandomSubset"])


def test_handwritten_relion_30(clean, tmp_path):
    shutil.copyfile(clean / "sim.mrcs", tmp_path / "sim.mrcs")
    rows = [  # rot tilt psi originX(px) originY(px) dfU dfV dfAngle subset
        (10.0, 20.0, 30.0, 1.5, -2.25, 20000.0, 19000.0, 45.0, 1),
        (-170.5, 90.0, 359.0, 0.0, 3.0, 15000.0, 15500.0, 0.0, 2),
        (0.0, 179.9, -45.0, -4.0, 0.5, 30000.0, 30000.0, 120.0, 1),
    ]
    lines = ["", "data_", "", "loop_"]
    labels = ["rlnImageName", "rlnMicrographName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX",
              "rlnOriginY", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
              "rlnAmplitudeContrast", "rlnMagnification", "rlnDetectorPixelSize", "rlnCtfBfactor", "rlnRandomSubset"]
    lines += [f"_{lab} #{k + 1}" for k, lab in enumerate(labels)]
    for k, (rot, tilt, psi, ox, oy, du, dv, da, sub) in enumerate(rows):
        lines.append(f"{k + 3:06d}@sim.mrcs mics/m{k}.mrc {rot:12.6f} {tilt:12.6f} {psi:12.6f} {ox:12.6f} "
                     f"{oy:12.6f} {du:12.6f} {dv:12.6f} {da:12.6f} 200.000000 2.000000 0.070000 35000.000000 "
                     f"14.000000 50.000000 {sub}")
    path = tmp_path / "r30.star"
    path.write_text("\n".join(lines) + "\n")

    stack = read_star(path)
    assert len(stack) == 3 and stack.apix_A == pytest.approx(14.0 * 1e4 / 35000.0)  # 4.0 A
    rows = np.array(rows)
    np.testing.assert_allclose(stack.poses, rows[:, :5], atol=1e-12)  # origins in pixels: no scaling
    np.testing.assert_allclose(stack.ctf.defocus_u_A, rows[:, 5])
    np.testing.assert_allclose(stack.ctf.defocus_v_A, rows[:, 6])
    np.testing.assert_allclose(stack.ctf.astig_angle_deg, rows[:, 7])
    assert np.all(stack.ctf.voltage_kV == 200.0) and np.all(stack.ctf.cs_mm == 2.0)
    assert np.all(stack.ctf.amp_contrast == 0.07) and np.all(stack.ctf.bfactor_A2 == 50.0)
    assert sorted(stack.meta) == ["rlnMicrographName", "rlnRandomSubset"]
    np.testing.assert_array_equal(stack.read_images(), mrcfile.read(clean / "sim.mrcs")[2:5])

    # to 3.1: the optics table is made from the per-particle values
    back = read_star(write_star(stack, tmp_path / "r31.star"))
    _assert_same(stack, back, meta=False)
    optics = starfile.read(tmp_path / "r31.star", always_dict=True)["optics"]
    assert optics["rlnVoltage"].tolist() == [200.0] and optics["rlnImagePixelSize"].tolist() == [4.0]


def test_in_memory_images_are_written_beside(clean, tmp_path):
    src = read_star(clean / "sim.star")
    images = src.read_images(np.arange(20)) * 2.0
    stack = ParticleStack(images=ArrayImages(images), poses=src.poses[:20], apix_A=4.0, ctf=src.ctf[:20],
                          meta={"rlnRandomSubset": src.meta["rlnRandomSubset"][:20]})
    out = write_star(stack, tmp_path / "mem.star")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem.mrcs", "mem.star"]
    with mrcfile.open(tmp_path / "mem.mrcs", permissive=False) as mrc:
        assert mrc.header.ispg == 0 and mrc.voxel_size.x == pytest.approx(4.0)
    back = read_star(out)
    # tmp_path is outside the current folder: the path is absolute (inside it, relative to it: the test above)
    assert back.image_refs[0] == f"000001@{(tmp_path / 'mem.mrcs').as_posix()}"
    assert isinstance(back.images, MrcStackImages)
    np.testing.assert_array_equal(back.read_images(), images)
    _assert_same(stack, back, meta=False)


def test_optics_groups_round_trip(local_copy, tmp_path):
    """Two optics groups with one pixel size but different voltages: groups, names and extra columns survive."""
    blocks = starfile.read(local_copy / "start.star", always_dict=True)
    optics = pd.concat([blocks["optics"]] * 2, ignore_index=True)
    optics["rlnOpticsGroup"] = [1, 2]
    optics["rlnOpticsGroupName"] = ["grid_a", "grid_b"]
    optics["rlnVoltage"] = [300.0, 200.0]
    optics["rlnBeamTiltX"] = [0.1, -0.2]
    blocks["optics"] = optics
    blocks["particles"]["rlnOpticsGroup"] = np.arange(200) % 2 + 1
    starfile.write(blocks, local_copy / "two.star")

    stack = read_star(local_copy / "two.star")
    np.testing.assert_array_equal(stack.ctf.voltage_kV, np.where(np.arange(200) % 2, 200.0, 300.0))
    np.testing.assert_array_equal(stack.meta[OPTICS_PREFIX + "rlnBeamTiltX"], np.where(np.arange(200) % 2, -0.2, 0.1))
    back = read_star(write_star(stack, tmp_path / "two_out.star"))
    _assert_same(stack, back)
    opt = starfile.read(tmp_path / "two_out.star", always_dict=True)["optics"]
    assert opt["rlnOpticsGroupName"].tolist() == ["grid_a", "grid_b"]
    assert opt["rlnVoltage"].tolist() == [300.0, 200.0]


def test_missing_origins_mean_zero_shifts(local_copy):
    path = _edit_star(local_copy / "start.star", local_copy / "no_origin.star",
                      lambda t: t.drop(columns=["rlnOriginXAngst", "rlnOriginYAngst"]))
    stack = read_star(path)
    assert np.all(stack.poses[:, 3:] == 0)


def test_stack_without_ctf_round_trip(clean, tmp_path):
    stack = read_star(clean / "sim.star")
    bare = ParticleStack(images=stack.images, poses=stack.poses, apix_A=4.0, ctf=None)
    back = read_star(write_star(bare, tmp_path / "noctf.star"))
    assert back.ctf is None
    _assert_same(bare, back, meta=False)


# ----------------------------------------------------------------------------------------------- bad inputs
def test_no_angle_columns(local_copy):
    path = _edit_star(local_copy / "start.star", local_copy / "extract.star", lambda t: t.drop(columns=ANGLES))
    with pytest.raises(ValueError, match=r"extract\.star: no angle columns \(rlnAngleRot, rlnAngleTilt, "
                                         r"rlnAnglePsi\).*needs starting poses"):
        read_star(path)


def test_bad_angle_values(local_copy):
    def text(t):
        t["rlnAngleTilt"] = t["rlnAngleTilt"].astype(str)
        t.loc[4, "rlnAngleTilt"] = "abc"
        return t
    path = _edit_star(local_copy / "start.star", local_copy / "text.star", text)
    with pytest.raises(ValueError, match=r"text\.star: particle 5: rlnAngleTilt = 'abc' is not a number"):
        read_star(path)

    def nan(t):
        t.loc[6, "rlnAnglePsi"] = np.nan
        return t
    path = _edit_star(local_copy / "start.star", local_copy / "nan.star", nan)
    with pytest.raises(ValueError, match=r"nan\.star: pose of particle 6 is not finite"):
        read_star(path)


def test_index_past_end(local_copy):
    def bump(t):
        t.loc[7, "rlnImageName"] = "000201@sim.mrcs"
        return t
    path = _edit_star(local_copy / "start.star", local_copy / "past.star", bump)
    with pytest.raises(ValueError, match=r"past\.star: image 201@.*sim\.mrcs is past the end of .*sim\.mrcs "
                                         r"\(200 images\)"):
        read_star(path)


def test_bad_image_name(local_copy):
    def zero(t):
        t.loc[3, "rlnImageName"] = "000000@sim.mrcs"
        return t
    path = _edit_star(local_copy / "start.star", local_copy / "zero.star", zero)
    with pytest.raises(ValueError, match=r"zero\.star: particle 4: rlnImageName '000000@sim.mrcs'"):
        read_star(path)


def test_truncated_stack(local_copy):
    with open(local_copy / "sim.mrcs", "r+b") as fh:
        fh.truncate(1024 + 64 * 64 * 4 * 120)
    with pytest.raises(ValueError, match=r"sim\.mrcs: not a readable MRC file \(truncated\?\)"):
        read_star(local_copy / "start.star")


def test_missing_stack(local_copy):
    os.remove(local_copy / "sim.mrcs")
    with pytest.raises(FileNotFoundError, match=r"start\.star: image stack sim\.mrcs not found"):
        read_star(local_copy / "start.star")


def test_nan_pixels_reported_at_read_time(local_copy):
    with mrcfile.mmap(local_copy / "sim.mrcs", mode="r+") as mrc:
        mrc.data[9, 10, 10] = np.nan
    stack = read_star(local_copy / "start.star")  # headers are fine
    stack.read_images(np.arange(9))
    with pytest.raises(ValueError, match=r"start\.star: .*sim\.mrcs: image 10 \(1-based\) contains NaN"):
        stack.read_images(np.arange(20))


def test_non_square_stack(local_copy, rng):
    with warnings.catch_warnings(), mrcfile.new(local_copy / "rect.mrcs") as mrc:
        mrc.set_data(rng.standard_normal((200, 64, 60)).astype(np.float32))
        mrc.set_image_stack()
    path = _edit_star(local_copy / "start.star", local_copy / "rect.star",
                      lambda t: t.assign(rlnImageName=t["rlnImageName"].str.replace("sim.mrcs", "rect.mrcs")))
    with pytest.raises(ValueError, match=r"rect\.star: .*rect\.mrcs holds 60 x 64 pixel images; .*square"):
        read_star(path)


def test_different_pixel_sizes_refused(local_copy):
    blocks = starfile.read(local_copy / "start.star", always_dict=True)
    optics = pd.concat([blocks["optics"]] * 2, ignore_index=True)
    optics["rlnOpticsGroup"] = [1, 2]
    optics["rlnImagePixelSize"] = [4.0, 2.0]
    blocks["optics"] = optics
    blocks["particles"]["rlnOpticsGroup"] = np.arange(200) % 2 + 1
    starfile.write(blocks, local_copy / "mixed.star")
    with pytest.raises(ValueError, match=r"mixed\.star: particles have different pixel sizes.*not supported yet"):
        read_star(local_copy / "mixed.star")


def test_unknown_optics_group(local_copy):
    path = _edit_star(local_copy / "start.star", local_copy / "grp.star", lambda t: t.assign(rlnOpticsGroup=3))
    with pytest.raises(ValueError, match=r"grp\.star: particle 1 has rlnOpticsGroup 3"):
        read_star(path)


def test_not_a_particle_star(tmp_path):
    path = tmp_path / "mics.star"
    starfile.write(pd.DataFrame({"rlnMicrographName": ["a.mrc"], "rlnDefocusU": [1.0]}), path)
    with pytest.raises(ValueError, match=r"mics\.star: no particle table"):
        read_star(path)
    with pytest.raises(FileNotFoundError, match="absent.star"):
        read_star(tmp_path / "absent.star")


def test_existing_outputs_refused(clean, tmp_path):
    stack = read_star(clean / "sim.star")
    (tmp_path / "out.star").write_text("old")
    with pytest.raises(FileExistsError, match=r"out\.star"):
        write_star(stack, tmp_path / "out.star")
    assert (tmp_path / "out.star").read_text() == "old"
    write_star(stack, tmp_path / "out.star", overwrite=True)
    assert read_star(tmp_path / "out.star").box == 64

    # the images' .mrcs beside the STAR file exists already: nothing is written
    mem = ParticleStack(images=ArrayImages(stack.read_images(np.arange(4))), poses=stack.poses[:4], apix_A=4.0)
    (tmp_path / "mem.mrcs").write_text("old")
    with pytest.raises(FileExistsError, match=r"mem\.mrcs"):
        write_star(mem, tmp_path / "mem.star")
    assert not (tmp_path / "mem.star").exists() and (tmp_path / "mem.mrcs").read_text() == "old"


def test_failed_write_leaves_nothing(clean, tmp_path, monkeypatch):
    stack = read_star(clean / "sim.star")
    images = stack.read_images()
    images[150, 5, 5] = np.nan  # found while writing the .mrcs, after the first chunk
    bad = ParticleStack(images=ArrayImages(images, "mem"), poses=stack.poses, apix_A=4.0, ctf=stack.ctf)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="image 151"):
        write_star(bad, out / "bad.star")
    assert list(out.iterdir()) == []

    # a failure while writing the STAR table (after the .mrcs is complete) removes the .mrcs as well
    def broken_write(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(star_module.starfile, "write", broken_write)
    good = ParticleStack(images=ArrayImages(stack.read_images()), poses=stack.poses, apix_A=4.0, ctf=stack.ctf)
    with pytest.raises(OSError, match="disk full"):
        write_star(good, out / "good.star")
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ real files from cryoDRGN (issue 12)
from gpu_ali3d.io.mrc import write_mrc_stack  # noqa: E402
from gpu_ali3d.io.stack import check_refinable  # noqa: E402


def _stand_in_stacks(folder: Path, table: pd.DataFrame, box: int) -> None:
    """Write, under folder, a random float32 stack for every file rlnImageName names, long enough for its
    highest index (the real stacks are not in the fixtures)."""
    rng = np.random.default_rng(0)
    needed: dict[str, int] = {}
    for name in table["rlnImageName"]:
        at, _, f = str(name).partition("@")
        needed[f] = max(needed.get(f, 0), int(at))
    for f, n in needed.items():
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        write_mrc_stack(folder / f, rng.standard_normal((n, box, box)).astype(np.float32), 1.0)


@pytest.fixture
def pfcrt(test_data, tmp_path) -> Path:
    """cryoDRGN's FinalRefinement-OriginalParticles-PfCRT.star (no rlnAmplitudeContrast) with stand-in stacks."""
    star = tmp_path / "pfcrt.star"
    shutil.copyfile(test_data / "cryodrgn" / "FinalRefinement-OriginalParticles-PfCRT.star", star)
    _stand_in_stacks(tmp_path, starfile.read(star), 16)
    return star


@pytest.fixture
def relion5(test_data, tmp_path) -> Path:
    """cryoDRGN's relion5.star with stand-in 30-pixel stacks and rlnImageSize set to 30 (the file says 448)."""
    star = tmp_path / "relion5.star"
    blocks = starfile.read(test_data / "cryodrgn" / "relion5.star", always_dict=True)
    blocks["optics"]["rlnImageSize"] = 30
    starfile.write(blocks, star)
    _stand_in_stacks(tmp_path, blocks["particles"], 30)
    return star


def _edit_block(star: Path, block: str, fn) -> Path:
    blocks = starfile.read(star, always_dict=True)
    blocks[block] = fn(blocks[block].copy())
    starfile.write(blocks, star)
    return star


def test_star_without_amplitude_contrast_uses_relions_default(pfcrt):
    table = starfile.read(pfcrt)
    assert "rlnAmplitudeContrast" not in table.columns
    stack = read_star(pfcrt)
    np.testing.assert_array_equal(stack.ctf.defocus_u_A, table["rlnDefocusU"])
    np.testing.assert_array_equal(stack.ctf.defocus_v_A, table["rlnDefocusV"])
    np.testing.assert_array_equal(stack.ctf.astig_angle_deg, table["rlnDefocusAngle"])
    np.testing.assert_array_equal(stack.ctf.voltage_kV, table["rlnVoltage"])
    np.testing.assert_array_equal(stack.ctf.cs_mm, table["rlnSphericalAberration"])
    assert np.all(stack.ctf.amp_contrast == 0.1)
    assert stack.apix_A == pytest.approx(table["rlnDetectorPixelSize"][0] * 1e4 / table["rlnMagnification"][0])
    np.testing.assert_array_equal(stack.poses[:, :3], table[ANGLES].to_numpy())
    np.testing.assert_array_equal(stack.poses[:, 3:], table[["rlnOriginX", "rlnOriginY"]].to_numpy())
    said = []
    check_refinable(stack, ctf=False, say=said.append)
    assert said == []                                          # not said when the CTF is not used
    check_refinable(stack, ctf=True, say=said.append)
    assert len(said) == 1 and "rlnAmplitudeContrast" in said[0] and "0.1" in said[0] and "pfcrt.star" in said[0]


def test_star_without_voltage_is_read_and_refused_only_with_ctf(pfcrt):
    _edit_block(pfcrt, "images", lambda t: t.drop(columns=["rlnVoltage"]))
    stack = read_star(pfcrt)
    assert stack.ctf is None and "rlnDefocusU" in stack.meta       # kept for the outputs
    check_refinable(stack, ctf=False)
    with pytest.raises(ValueError, match=r"--CTF: .*pfcrt\.star: defocus is given but rlnVoltage not"):
        check_refinable(stack, ctf=True)


def test_image_name_without_at_is_a_whole_single_image_file(local_copy):
    rng = np.random.default_rng(1)
    single = write_mrc_stack(local_copy / "one.mrcs", rng.standard_normal((1, 64, 64)).astype(np.float32), 4.0)
    star = _edit_star(local_copy / "start.star", local_copy / "plain.star",
                      lambda t: t.assign(rlnImageName=[single.name] + list(t["rlnImageName"][1:])))
    stack = read_star(star)
    np.testing.assert_array_equal(stack.read_images([0])[0], mrcfile.read(single).reshape(64, 64))
    star = _edit_star(local_copy / "start.star", local_copy / "plain2.star",
                      lambda t: t.assign(rlnImageName=list(t["rlnImageName"][:3]) + ["sim.mrcs"]
                                         + list(t["rlnImageName"][4:])))
    with pytest.raises(ValueError, match=r"plain2\.star: particle 4: rlnImageName 'sim\.mrcs' has no "
                                         r"'index@'.*holds 200 images"):
        read_star(star)


def test_relion5_file_values(relion5):
    blocks = starfile.read(relion5, always_dict=True)
    table, optics = blocks["particles"], blocks["optics"]
    stack = read_star(relion5)
    assert (len(stack), stack.box, stack.apix_A) == (len(table), 30, optics["rlnImagePixelSize"][0])
    np.testing.assert_array_equal(stack.poses[:, :3], table[ANGLES].to_numpy())
    np.testing.assert_allclose(stack.poses[:, 3:], table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
                               / optics["rlnImagePixelSize"][0], rtol=1e-15)
    np.testing.assert_array_equal(stack.ctf.defocus_u_A, table["rlnDefocusU"])
    np.testing.assert_array_equal(stack.ctf.bfactor_A2, table["rlnCtfBfactor"])
    assert np.all(stack.ctf.voltage_kV == optics["rlnVoltage"][0])
    np.testing.assert_array_equal(stack.meta["rlnClassNumber"], table["rlnClassNumber"])
    np.testing.assert_array_equal(stack.meta["rlnRandomSubset"], table["rlnRandomSubset"])
    assert stack.ctf_refusal is None and stack.ctf_notes == []
    check_refinable(stack, ctf=True)


def test_relion5_image_size_must_match_the_images(relion5):
    _edit_block(relion5, "optics", lambda t: t.assign(rlnImageSize=448))
    with pytest.raises(ValueError, match=r"relion5\.star: rlnImageSize is 448 \(optics group 1\) but the images "
                                         r"of particle 1 in .*toy_images_a\.mrcs are 30 pixels"):
        read_star(relion5)


@pytest.mark.parametrize("edit, fragment", [
    (lambda b: b["optics"].__setitem__("rlnImageDimensionality", 3), "rlnImageDimensionality 3 in data_optics"),
    (lambda b: b["particles"].__setitem__("rlnTomoName", "TS_01"), "tomography file (data_particles has "
                                                                   "rlnTomoName)"),
    (lambda b: b.__setitem__("general", {"rlnTomoSubTomosAre2DStacks": 1}), "rlnTomoSubTomosAre2DStacks"),
])
def test_relion5_tomography_is_refused(relion5, edit, fragment):
    blocks = starfile.read(relion5, always_dict=True)
    edit(blocks)
    starfile.write(blocks, relion5)
    with pytest.raises(ValueError, match="relion5.star: ") as info:
        read_star(relion5)
    assert fragment in str(info.value) and "2-D images only" in str(info.value)


def test_relion5_ctf_premultiplied_bfactor_and_scale(relion5):
    _edit_block(relion5, "particles", lambda t: t.assign(rlnCtfBfactor=np.arange(len(t)) * 10.0))
    stack = read_star(relion5)
    np.testing.assert_array_equal(stack.ctf.bfactor_A2, starfile.read(relion5, always_dict=True)["particles"]
                                  ["rlnCtfBfactor"])
    _edit_block(relion5, "particles", lambda t: t.assign(rlnCtfScalefactor=[1.0] * 2 + [0.8] * (len(t) - 2)))
    stack = read_star(relion5)
    check_refinable(stack, ctf=False)
    with pytest.raises(ValueError, match=r"--CTF: .*particle 3: rlnCtfScalefactor = 0\.8; only 1"):
        check_refinable(stack, ctf=True)
    _edit_block(relion5, "optics", lambda t: t.assign(rlnCtfDataAreCtfPremultiplied=1))
    stack = read_star(relion5)
    assert stack.ctf is not None                                   # still read, and written out again
    with pytest.raises(ValueError, match=r"--CTF: .*rlnCtfDataAreCtfPremultiplied = 1.*apply it a second time"):
        check_refinable(stack, ctf=True)
    check_refinable(stack, ctf=False)


def test_missing_stack_message_names_each_place_once(local_copy, monkeypatch):
    (local_copy / "sim.mrcs").unlink()
    monkeypatch.chdir(local_copy)
    with pytest.raises(FileNotFoundError) as info:
        read_star("start.star")
    text = str(info.value)
    where = str(local_copy / "sim.mrcs")
    assert text.count(where) == 1 and "image_dir" not in text and "project folder" in text, text


# ------------------------------------------------------- image paths as RELION resolves them (issue 12, item 1)
from gpu_ali3d.io.star import OddBoxWarning, replace_star_poses  # noqa: E402


def _relion_project(tmp_path: Path, clean: Path) -> Path:
    """A RELION project layout: Extract/job005/sim.mrcs, and Refine3D/job010/run_data.star naming its images
    'Extract/job005/sim.mrcs' (relative to the project folder, as RELION writes them)."""
    project = tmp_path / "project"
    (project / "Extract" / "job005").mkdir(parents=True)
    (project / "Refine3D" / "job010").mkdir(parents=True)
    shutil.copyfile(clean / "sim.mrcs", project / "Extract" / "job005" / "sim.mrcs")
    _edit_star(clean / "start.star", project / "Refine3D" / "job010" / "run_data.star",
               lambda t: t.assign(rlnImageName=t["rlnImageName"].str.replace("@", "@Extract/job005/")))
    return project


def test_image_paths_are_found_from_the_current_folder_as_relion_does(clean, tmp_path, monkeypatch):
    project = _relion_project(tmp_path, clean)
    monkeypatch.chdir(project)
    stack = read_star("Refine3D/job010/run_data.star")
    assert stack.images.files == [project / "Extract" / "job005" / "sim.mrcs"]
    np.testing.assert_array_equal(stack.read_images([0, 199]), mrcfile.read(clean / "sim.mrcs")[[0, 199]])
    # from elsewhere neither the current folder nor the STAR's folder holds Extract/job005/sim.mrcs
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        read_star(project / "Refine3D" / "job010" / "run_data.star")
    text = str(info.value)
    assert str(tmp_path / "Extract" / "job005" / "sim.mrcs") in text, text
    assert str(project / "Refine3D" / "job010" / "Extract" / "job005" / "sim.mrcs") in text, text


def test_paths_relative_to_the_star_folder_still_read(local_copy, tmp_path, monkeypatch):
    """Files whose paths are relative to their own folder (gpu-ali3d's before, other tools', copies made with
    their stacks) are read from any folder: the fallback when the current folder does not hold the file."""
    monkeypatch.chdir(tmp_path)
    stack = read_star(local_copy / "start.star")
    assert stack.images.files == [local_copy / "sim.mrcs"]


def test_a_path_both_folders_resolve_to_different_files_is_refused_naming_both(local_copy, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copyfile(local_copy / "sim.mrcs", other / "sim.mrcs")
    monkeypatch.chdir(other)
    with pytest.raises(ValueError) as info:
        read_star(local_copy / "start.star")
    text = str(info.value)
    assert "ambiguous" in text and str(other / "sim.mrcs") in text and str(local_copy / "sim.mrcs") in text, text
    # the same file reached both ways (here: the current folder is the STAR's) is no ambiguity
    monkeypatch.chdir(local_copy)
    assert read_star("start.star").images.files == [local_copy / "sim.mrcs"]
    (other / "sim.mrcs").unlink()
    (other / "sim.mrcs").symlink_to(local_copy / "sim.mrcs")
    monkeypatch.chdir(other)
    assert len(read_star(local_copy / "start.star")) == 200


def test_every_file_we_write_reads_back_from_the_folder_it_was_written_in(clean, tmp_path, monkeypatch):
    """Written from the project folder (images inside it: relative paths), read back there; written with the images
    outside the current folder (absolute paths), read back from anywhere."""
    project = _relion_project(tmp_path, clean)
    monkeypatch.chdir(project)
    stack = read_star("Refine3D/job010/run_data.star")
    (project / "Refine3D" / "job011").mkdir()
    out = write_star(stack, "Refine3D/job011/particles.star")
    names = starfile.read(out)["particles"]["rlnImageName"]
    assert {n.split("@")[1] for n in names} == {"Extract/job005/sim.mrcs"}
    _assert_same(stack, read_star(out))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                             # the images are outside this folder: absolute paths
    outside = write_star(stack, elsewhere / "abs.star")
    assert {n.split("@")[1] for n in starfile.read(outside)["particles"]["rlnImageName"]} == \
        {(project / "Extract" / "job005" / "sim.mrcs").as_posix()}
    monkeypatch.chdir(project / "Extract")
    _assert_same(stack, read_star(outside))


def test_replace_star_poses_changes_the_pose_columns_only(clean, tmp_path, monkeypatch):
    """--write-headers' writer: the input's image names (here in forms our writer would never produce: a './'
    and RELION's ':mrcs' type suffix), optics, CTF and other columns keep the file's values; poses and half sets are
    the stack's."""
    project = _relion_project(tmp_path, clean)
    star = project / "Refine3D" / "job010" / "run_data.star"
    _edit_star(star, star, lambda t: t.assign(rlnImageName=t["rlnImageName"].str.replace("@", "@./") + ":mrcs",
                                              rlnMicrographName=[f"mics/m{k}.mrc" for k in range(len(t))]))
    monkeypatch.chdir(project)
    before = starfile.read(star, always_dict=True)
    stack = read_star(star)
    rng = np.random.default_rng(5)
    stack.poses = stack.poses + rng.uniform(-3, 3, stack.poses.shape)
    stack.meta["rlnRandomSubset"] = 3 - np.asarray(stack.meta["rlnRandomSubset"])    # swapped half sets
    replace_star_poses(stack, star)
    after = starfile.read(star, always_dict=True)
    assert list(after) == list(before)
    pd.testing.assert_frame_equal(after["optics"], before["optics"], check_dtype=False)   # 300.000000 -> 300
    old, new = before["particles"], after["particles"]
    assert list(new.columns) == list(old.columns)
    pose_columns = ANGLES + ["rlnOriginXAngst", "rlnOriginYAngst"]
    for c in old.columns:
        if c not in pose_columns + ["rlnRandomSubset"]:
            pd.testing.assert_series_equal(new[c], old[c], check_dtype=False, rtol=0, atol=0, obj=c)
    assert new["rlnImageName"][0] == "000001@./Extract/job005/sim.mrcs:mrcs"
    np.testing.assert_array_equal(new["rlnRandomSubset"], 3 - old["rlnRandomSubset"])
    back = read_star(star)
    assert angular_distance(back.poses, stack.poses).max() < 1e-6
    np.testing.assert_allclose(back.poses[:, 3:], stack.poses[:, 3:], atol=1e-9)

    # a file that no longer holds the particles read from it is refused, and left as it is
    shorter = stack.images.refs()[:10]
    small = ParticleStack(images=MrcStackImages(shorter, "x"), poses=stack.poses[:10], apix_A=4.0,
                          image_refs=stack.image_refs[:10])
    with pytest.raises(ValueError, match=r"no longer holds the 10 particles"):
        replace_star_poses(small, star)
    pd.testing.assert_frame_equal(starfile.read(star, always_dict=True)["particles"], new)


def test_replace_star_poses_keeps_relion_30_origins_in_pixels(clean, tmp_path):
    stack = read_star(clean / "start.star")
    star = write_star(stack, tmp_path / "p30.star", version="3.0")
    stack = read_star(star)
    stack.poses[:, 3:] += 0.5
    replace_star_poses(stack, star)
    table = starfile.read(star)
    assert "rlnOriginXAngst" not in table.columns
    np.testing.assert_allclose(table[["rlnOriginX", "rlnOriginY"]].to_numpy(), stack.poses[:, 3:], atol=1e-9)


# ------------------------------------------------------------------------------ odd boxes (issue 12, item 8)
def test_odd_box_star_is_written_with_a_one_line_warning(tmp_path):
    stack = ParticleStack(images=ArrayImages(np.ones((3, 33, 33), np.float32)), poses=np.zeros((3, 5)), apix_A=2.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_star(stack, tmp_path / "a.star")
        write_star(stack, tmp_path / "b.star", version="3.0")
    odd = [w for w in caught if issubclass(w.category, OddBoxWarning)]
    assert len(odd) == 2, [str(w.message) for w in caught]                 # one per file (the CLI says it once)
    text = str(odd[0].message)
    assert "\n" not in text and "33 pixels" in text and "RELION" in text and "even box" in text
    assert read_star(tmp_path / "b.star").box == 33                                 # written all the same
    even = ParticleStack(images=ArrayImages(np.ones((3, 32, 32), np.float32)), poses=np.zeros((3, 5)), apix_A=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OddBoxWarning)
        write_star(even, tmp_path / "c.star")
