"""cryoSPARC .cs files: built from the RELION simulation's poses, read back and compared with the STAR reading."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from gpu_ali3d.geometry import angular_distance, cryosparc_from_spider, rotation_matrix
from gpu_ali3d.io.cryosparc import read_cs, write_cs
from gpu_ali3d.io.stack import ArrayImages, ParticleStack
from gpu_ali3d.io.star import read_star


@pytest.fixture
def clean(shared_data) -> Path:
    return shared_data / "relion_sim" / "clean"


def make_cs(stack: ParticleStack, blob_path: str, *, alignments: bool = True) -> np.ndarray:
    """A particle .cs array as cryoSPARC writes it (its field names and float32/uint32 types)."""
    n = len(stack)
    fields = [("uid", "<u8"), ("blob/path", "S200"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
              ("blob/psize_A", "<f4"), ("blob/sign", "<f4"),
              ("ctf/type", "S1"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
              ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4")]
    if alignments:
        fields += [("alignments3D/split", "<u4"), ("alignments3D/pose", "<f4", (3,)),
                   ("alignments3D/shift", "<f4", (2,)), ("alignments3D/psize_A", "<f4")]
    cs = np.zeros(n, dtype=fields)
    cs["uid"] = np.arange(n, dtype=np.uint64) * 7919 + 12345
    cs["blob/path"] = blob_path.encode()
    cs["blob/idx"] = np.arange(n)
    cs["blob/shape"] = stack.box
    cs["blob/psize_A"] = stack.apix_A
    cs["blob/sign"] = -1.0
    c = stack.ctf
    cs["ctf/accel_kv"], cs["ctf/cs_mm"], cs["ctf/amp_contrast"] = c.voltage_kV, c.cs_mm, c.amp_contrast
    cs["ctf/df1_A"], cs["ctf/df2_A"] = c.defocus_u_A, c.defocus_v_A
    cs["ctf/df_angle_rad"] = np.deg2rad(c.astig_angle_deg)
    if alignments:
        cs["alignments3D/split"] = stack.meta["rlnRandomSubset"] - 1
        cs["alignments3D/pose"], cs["alignments3D/shift"] = cryosparc_from_spider(stack.poses)
        cs["alignments3D/psize_A"] = stack.apix_A
    return cs


def save_cs(path: Path, cs: np.ndarray) -> Path:
    with open(path, "wb") as fh:  # cryoSPARC's .cs is np.save output under another name
        np.save(fh, cs)
    return path


def assert_same_particles(cs_stack: ParticleStack, star_stack: ParticleStack):
    assert len(cs_stack) == len(star_stack) and cs_stack.box == star_stack.box
    assert cs_stack.apix_A == star_stack.apix_A
    # float32 rotation vectors: rounding of about 1e-7 rad (6e-6 degrees)
    assert angular_distance(cs_stack.poses, star_stack.poses).max() < 1e-4
    # and the same rotation matrices, not just the same angle between them
    ra = rotation_matrix(*cs_stack.poses[:, :3].T)
    rb = rotation_matrix(*star_stack.poses[:, :3].T)
    np.testing.assert_allclose(ra, rb, atol=2e-6)
    np.testing.assert_allclose(cs_stack.poses[:, 3:], star_stack.poses[:, 3:], atol=1e-5)  # float32 pixels
    # float32 storage: relative 6e-8 on defocus, 6e-8 rad (4e-6 degrees) on the astigmatism angle
    assert cs_stack.ctf.allclose(star_stack.ctf, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(cs_stack.meta["rlnRandomSubset"], star_stack.meta["rlnRandomSubset"])
    idx = np.array([0, 99, 199])
    np.testing.assert_array_equal(cs_stack.read_images(idx), star_stack.read_images(idx))


@pytest.mark.parametrize("name", ["sim.star", "start.star"])  # true poses; perturbed poses with real shifts
def test_cs_matches_star(clean, tmp_path, name):
    star = read_star(clean / name)
    job = tmp_path / "J7"
    job.mkdir()
    rel = os.path.relpath(clean / "sim.mrcs", job)
    cs_path = save_cs(job / "particles.cs", make_cs(star, ">" + rel))
    stack = read_cs(cs_path)
    assert_same_particles(stack, star)
    assert stack.image_refs[0] == f"000001@{rel}"
    assert stack.meta["uid"][1] == 12345 + 7919
    np.testing.assert_array_equal(stack.read_images(), mrcfile.read(clean / "sim.mrcs"))


def test_project_relative_paths(clean, tmp_path):
    """blob/path relative to the project directory (cryoSPARC's layout): found from <project>/J<n>/x.cs or via
    project_dir."""
    star = read_star(clean / "sim.star")
    (tmp_path / "J2" / "extract").mkdir(parents=True)
    shutil.copyfile(clean / "sim.mrcs", tmp_path / "J2" / "extract" / "sim.mrcs")
    (tmp_path / "J9").mkdir()
    cs = make_cs(star, ">J2/extract/sim.mrcs")
    assert_same_particles(read_cs(save_cs(tmp_path / "J9" / "p.cs", cs)), star)
    elsewhere = tmp_path / "exports" / "groups"  # two levels down: not found without project_dir
    elsewhere.mkdir(parents=True)
    save_cs(elsewhere / "p.cs", cs)
    with pytest.raises(FileNotFoundError, match=r"p\.cs: image stack J2/extract/sim\.mrcs not found.*cryoSPARC project folder"):
        read_cs(elsewhere / "p.cs")
    assert_same_particles(read_cs(elsewhere / "p.cs", project_dir=tmp_path), star)


def test_write_cs_round_trip(clean, tmp_path):
    star = read_star(clean / "start.star")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    path = write_cs(star, out_dir / "refined.cs")
    assert sorted(p.name for p in out_dir.iterdir()) == ["refined.cs"]  # images referenced, not copied
    cs = np.load(path)
    assert cs["blob/path"][0].decode() == (clean / "sim.mrcs").as_posix()   # outside the current folder: absolute
    assert_same_particles(read_cs(path), star)
    with pytest.raises(FileExistsError, match=r"refined\.cs"):
        write_cs(star, path)

    mem = ParticleStack(images=ArrayImages(star.read_images()), poses=star.poses, apix_A=4.0, ctf=star.ctf,
                        meta={"rlnRandomSubset": star.meta["rlnRandomSubset"]})
    path = write_cs(mem, out_dir / "mem.cs")
    assert sorted(p.name for p in out_dir.iterdir()) == ["mem.cs", "mem.mrcs", "refined.cs"]
    assert_same_particles(read_cs(path), star)


def test_missing_alignments(clean, tmp_path):
    star = read_star(clean / "sim.star")
    path = save_cs(tmp_path / "extracted.cs", make_cs(star, os.path.relpath(clean / "sim.mrcs", tmp_path),
                                                      alignments=False))
    with pytest.raises(ValueError, match=r"extracted\.cs: no alignments3D/pose, alignments3D/shift .*poses"):
        read_cs(path)


def test_bad_inputs(clean, tmp_path):
    junk = tmp_path / "junk.cs"
    junk.write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match=r"junk\.cs: not a cryoSPARC \.cs file"):
        read_cs(junk)
    star = read_star(clean / "sim.star")
    cs = make_cs(star, os.path.relpath(clean / "sim.mrcs", tmp_path))
    cs["blob/idx"][5] = 200
    with pytest.raises(ValueError, match=r"past\.cs: image 201@.*sim\.mrcs is past the end .*\(200 images\)"):
        read_cs(save_cs(tmp_path / "past.cs", cs))
    cs["blob/idx"][5] = 5
    cs["ctf/phase_shift_rad"] = 0.5
    with pytest.raises(ValueError, match=r"phase\.cs: .*phase-plate"):
        read_cs(save_cs(tmp_path / "phase.cs", cs))


def test_class_number_survives_cs(tmp_path, shared_data):
    """issue 12 item 10: rlnClassNumber (1-based) <-> alignments3D/class (0-based, cryoSPARC's)."""
    star = read_star(shared_data / "relion_sim" / "clean" / "sim.star")
    star.meta["rlnClassNumber"] = np.arange(len(star)) % 4 + 1
    write_cs(star, tmp_path / "p.cs")
    raw = np.load(tmp_path / "p.cs")
    np.testing.assert_array_equal(raw["alignments3D/class"], np.arange(len(star)) % 4)
    back = read_cs(tmp_path / "p.cs")
    np.testing.assert_array_equal(back.meta["rlnClassNumber"], star.meta["rlnClassNumber"])
    np.testing.assert_array_equal(back.meta["rlnRandomSubset"], star.meta["rlnRandomSubset"])


# ------------------------------------------------------------ a real cryoSPARC refinement's .cs (issue 12, item 7)
from scipy.spatial.transform import Rotation  # noqa: E402

from gpu_ali3d.io.cryosparc import replace_cs_poses  # noqa: E402
from gpu_ali3d.io.mrc import write_mrc_stack  # noqa: E402


@pytest.fixture
def real_cs(test_data) -> np.ndarray:
    """Five rows of a cryoSPARC 3D refinement's particles (cryoDRGN's test data; tests/data/cryodrgn/README.md)."""
    return np.load(test_data / "cryodrgn" / "cryosparc_P12_J24_001_particles.head5.cs")


def test_our_cs_has_the_fields_a_cryosparc_refinement_writes(clean, tmp_path, real_cs):
    """alignments3D/class_posterior (1.0) and alignments3D/class (0) are there, as in cryoSPARC's own file, and every
    field we share with it has its type and shape (blob/path: bytes of any length)."""
    assert real_cs["alignments3D/class_posterior"].tolist() == [1.0] * 5 and real_cs["alignments3D/class"].tolist() \
        == [0] * 5
    ours = np.load(write_cs(read_star(clean / "start.star"), tmp_path / "ours.cs"))
    for name in ("alignments3D/class_posterior", "alignments3D/class"):
        assert name in ours.dtype.names, name
    shared = [f for f in ours.dtype.names if f in real_cs.dtype.names]
    assert len(shared) == len(ours.dtype.names) - 1                   # all but ctf/bfactor, which cryoSPARC adds
    for name in shared:                                              # with the B-factor set only
        if name == "blob/path":
            assert ours.dtype[name].kind == real_cs.dtype[name].kind == "S"
        else:
            assert ours.dtype[name] == real_cs.dtype[name], (name, ours.dtype[name], real_cs.dtype[name])
    assert np.all(ours["alignments3D/class_posterior"] == 1.0) and np.all(ours["alignments3D/class"] == 0)


def test_a_real_cryosparc_cs_reads_with_its_own_values(tmp_path, real_cs, monkeypatch):
    """The real file in its project layout (<project>/J24/, blob/path 'J19/extract/...'), read from elsewhere,
    with a stand-in stack (its images are not in the fixtures): each value against the file's own fields."""
    project = tmp_path / "P12"
    (project / "J24").mkdir(parents=True)
    save_cs(project / "J24" / "particles.cs", real_cs)
    stand_in = np.random.default_rng(0).standard_normal((5, 180, 180)).astype(np.float32)
    (project / "J19" / "extract").mkdir(parents=True)
    write_mrc_stack(project / real_cs["blob/path"][0].decode(), stand_in, 2.95)
    monkeypatch.chdir(tmp_path)
    stack = read_cs(project / "J24" / "particles.cs")
    assert (len(stack), stack.box, stack.apix_A) == (5, 180, 2.95)
    from_file = Rotation.from_rotvec(real_cs["alignments3D/pose"].astype(np.float64))
    ours = Rotation.from_euler("ZYZ", stack.poses[:, :3], degrees=True)   # cryoSPARC's = RELION's transposed
    assert np.rad2deg((from_file.inv() * ours).magnitude()).max() < 1e-6
    np.testing.assert_allclose(stack.poses[:, 3:], real_cs["alignments3D/shift"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(stack.ctf.defocus_u_A, real_cs["ctf/df1_A"])
    np.testing.assert_array_equal(stack.meta["rlnRandomSubset"], real_cs["alignments3D/split"] + 1)
    np.testing.assert_array_equal(stack.meta["rlnClassNumber"], real_cs["alignments3D/class"] + 1)
    np.testing.assert_array_equal(stack.read_images(), stand_in)


def test_cs_paths_are_found_from_the_current_folder_first(clean, tmp_path, monkeypatch):
    """What write_cs writes (blob/path relative to the folder it ran in) reads back from there; a path that two
    of the places resolve to different files is refused, naming both."""
    star = read_star(clean / "sim.star")
    shutil.copyfile(clean / "sim.mrcs", tmp_path / "sim.mrcs")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    star = ParticleStack(images=read_cs(save_cs(tmp_path / "in.cs", make_cs(star, "sim.mrcs"))).images,
                         poses=star.poses, apix_A=star.apix_A, ctf=star.ctf, meta=star.meta)
    path = write_cs(star, "out/p.cs")
    assert set(np.load(path)["blob/path"]) == {b"sim.mrcs"}
    assert_same_particles(read_cs(path), star)
    shutil.copyfile(clean / "sim.mrcs", tmp_path / "out" / "sim.mrcs")
    with pytest.raises(ValueError) as info:
        read_cs(path)
    text = str(info.value)
    assert "ambiguous" in text and str(tmp_path / "sim.mrcs") in text and str(tmp_path / "out" / "sim.mrcs") in text


def test_replace_cs_poses_keeps_every_other_field(clean, tmp_path):
    """--write-headers' writer for .cs: blob/path (with cryoSPARC's '>') and all but pose, shift and split keep the
    file's bytes."""
    star = read_star(clean / "start.star")
    (tmp_path / "J7").mkdir()
    rel = os.path.relpath(clean / "sim.mrcs", tmp_path / "J7")
    path = save_cs(tmp_path / "J7" / "particles.cs", make_cs(star, ">" + rel))
    before = np.load(path)
    stack = read_cs(path)
    stack.poses = stack.poses + np.random.default_rng(3).uniform(-2, 2, stack.poses.shape)
    stack.meta["rlnRandomSubset"] = 3 - stack.meta["rlnRandomSubset"]
    replace_cs_poses(stack, path)
    after = np.load(path)
    assert after.dtype == before.dtype
    changed = {"alignments3D/pose", "alignments3D/shift", "alignments3D/split"}
    for name in before.dtype.names:
        if name not in changed:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert after["blob/path"][0] == (">" + rel).encode()
    np.testing.assert_array_equal(after["alignments3D/split"], 1 - before["alignments3D/split"])
    assert angular_distance(read_cs(path).poses, stack.poses).max() < 1e-3     # float32 rotation vectors
    np.testing.assert_allclose(after["alignments3D/shift"], stack.poses[:, 3:], atol=1e-5)
