"""MRC stacks and volumes: lazy memory-mapped reading, header checks, atomic writing."""
from __future__ import annotations

import pickle
import shutil
import warnings

import mrcfile
import numpy as np
import pytest

from gpu_ali3d.io.mrc import (MrcStackImages, mrc_voxel_size, read_mrc_stack, read_volume, write_mrc_stack,
                              write_volume)
from gpu_ali3d.io.stack import ArrayImages


@pytest.fixture
def sim_mrcs(shared_data):
    return shared_data / "relion_sim" / "clean" / "sim.mrcs"


def _raw_stack(path, data, ispg=0, apix=2.0):
    """Write an MRC file with mrcfile directly (bypassing our checks), e.g. with NaN or non-square images."""
    with warnings.catch_warnings(), mrcfile.new(path) as mrc:
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile's header statistics of NaN/inf data
        mrc.set_data(np.asarray(data, dtype=np.float32))
        if data.ndim == 3 and ispg == 0:
            mrc.set_image_stack()
        mrc.voxel_size = apix
    return path


def test_read_bare_stack(sim_mrcs):
    stack = read_mrc_stack(sim_mrcs)
    truth = mrcfile.read(sim_mrcs)
    assert (len(stack), stack.box, stack.apix_A) == (200, 64, 4.0)
    assert stack.ctf is None and np.all(stack.poses == 0)
    assert stack.image_refs[0] == "000001@sim.mrcs" and stack.image_refs[-1] == "000200@sim.mrcs"
    idx = np.array([7, 3, 199, 3])
    np.testing.assert_array_equal(stack.read_images(idx), truth[idx])
    got = np.concatenate([im for _, im in stack.iter_chunks(chunk=64)])
    np.testing.assert_array_equal(got, truth)


def test_reading_is_memory_mapped(tmp_path, rng):
    # 2000 images of 64^2 (33 MB): reading three of them must go through a memory map, not a full read.
    data = rng.standard_normal((2000, 64, 64)).astype(np.float32)
    path = write_mrc_stack(tmp_path / "big.mrcs", data, 1.5)
    src = MrcStackImages([(path, i) for i in range(2000)], "big")
    np.testing.assert_array_equal(src.read(np.array([1999, 0, 1000])), data[[1999, 0, 1000]])
    mapped = src._data(0)
    assert isinstance(mapped, np.memmap)
    assert mapped.shape == (2000, 64, 64)
    # a pickled source (for worker processes) drops its open maps and reopens on demand
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone.read(np.array([5])), data[[5]])
    src.close()


def test_open_file_cache_is_bounded(tmp_path, rng):
    data = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    paths = [write_mrc_stack(tmp_path / f"s{k}.mrcs", data[k], 1.0) for k in range(4)]
    src = MrcStackImages([(p, i) for p in paths for i in range(3)], "many", max_open=2)
    np.testing.assert_array_equal(src.read(np.arange(12)), data.reshape(12, 8, 8))
    assert len(src._handles) <= 2


def test_write_stack_header_and_chunks(tmp_path, sim_mrcs):
    src = read_mrc_stack(sim_mrcs).images
    out = write_mrc_stack(tmp_path / "copy.mrcs", src, 4.0, chunk=7)  # 200 images in chunks of 7
    with mrcfile.open(out, permissive=False) as mrc:
        assert mrc.header.mode == 2 and mrc.header.ispg == 0 and mrc.is_image_stack()
        assert mrc.voxel_size.x == pytest.approx(4.0) and mrc.voxel_size.y == pytest.approx(4.0)
        np.testing.assert_array_equal(mrc.data, mrcfile.read(sim_mrcs))
        assert mrc.header.dmax == pytest.approx(float(mrc.data.max()))
        assert mrc.header.rms == pytest.approx(float(mrc.data.std()), rel=1e-5)
    assert mrc_voxel_size(out) == pytest.approx(4.0)
    assert read_mrc_stack(out).apix_A == pytest.approx(4.0)


def test_write_stack_refuses_existing_and_leaves_nothing_on_failure(tmp_path, rng):
    data = rng.standard_normal((10, 16, 16)).astype(np.float32)
    target = write_mrc_stack(tmp_path / "a.mrcs", data, 1.0)
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match="a.mrcs"):
        write_mrc_stack(target, data[:3], 1.0)
    assert target.read_bytes() == before
    write_mrc_stack(target, data[:3], 2.0, overwrite=True)
    assert mrcfile.read(target).shape == (3, 16, 16)

    bad = data.copy()
    bad[8, 3, 3] = np.nan  # found in the second chunk, after the first has been written
    with pytest.raises(ValueError, match="image 9"):
        write_mrc_stack(tmp_path / "b.mrcs", ArrayImages(bad, "bad"), 1.0, chunk=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mrcs"]


def test_truncated_stack(tmp_path, sim_mrcs):
    cut = tmp_path / "cut.mrcs"
    shutil.copyfile(sim_mrcs, cut)
    with open(cut, "r+b") as fh:
        fh.truncate(1024 + 64 * 64 * 4 * 150 + 100)
    with pytest.raises(ValueError, match=r"cut\.mrcs: not a readable MRC file \(truncated\?\)"):
        read_mrc_stack(cut)
    with pytest.raises(ValueError, match=r"cut\.mrcs: not a readable MRC file"):
        MrcStackImages([(cut, 0)], "x.star")


def test_not_an_mrc_file(tmp_path):
    junk = tmp_path / "junk.mrcs"
    junk.write_bytes(b"this is not an MRC file" * 100)
    with pytest.raises(ValueError, match="junk.mrcs: not a readable MRC file"):
        read_mrc_stack(junk)
    with pytest.raises(FileNotFoundError, match="missing.mrcs"):
        MrcStackImages([(tmp_path / "missing.mrcs", 0)], "x.star")


def test_non_square_and_mixed_boxes(tmp_path, rng):
    rect = _raw_stack(tmp_path / "rect.mrcs", rng.standard_normal((3, 32, 48)))
    with pytest.raises(ValueError, match=r"rect\.mrcs holds 48 x 32 pixel images; .*square"):
        read_mrc_stack(rect)
    a = _raw_stack(tmp_path / "a.mrcs", rng.standard_normal((3, 32, 32)))
    b = _raw_stack(tmp_path / "b.mrcs", rng.standard_normal((3, 48, 48)))
    with pytest.raises(ValueError, match="same box"):
        MrcStackImages([(a, 0), (b, 0)], "x.star")


def test_index_past_end(tmp_path, rng):
    a = _raw_stack(tmp_path / "stack.mrcs", rng.standard_normal((12, 8, 8)))
    with pytest.raises(ValueError, match=r"^x\.star: image 13@.*stack\.mrcs is past the end of .*stack\.mrcs "
                                         r"\(12 images\)"):
        MrcStackImages([(a, 0), (a, 12)], "x.star")


def test_nan_reported_at_read_time(tmp_path, rng):
    data = rng.standard_normal((6, 8, 8))
    data[4, 2, 2] = np.inf
    path = _raw_stack(tmp_path / "nan.mrcs", data)
    src = MrcStackImages([(path, i) for i in range(6)], "x.star")  # headers are fine: no error yet
    np.testing.assert_array_equal(src.read(np.arange(4)), data[:4].astype(np.float32))
    with pytest.raises(ValueError, match=r"x\.star: .*nan\.mrcs: image 5 \(1-based\) contains NaN or inf"):
        src.read(np.array([0, 4]))


def test_single_image_file(tmp_path, rng):
    img = rng.standard_normal((16, 16))
    path = _raw_stack(tmp_path / "one.mrc", img)
    src = MrcStackImages([(path, 0)], "one")
    assert src.box == 16
    np.testing.assert_array_equal(src.read(np.array([0]))[0], img.astype(np.float32))


def test_volume_round_trip(tmp_path, rng):
    vol = rng.standard_normal((20, 24, 28)).astype(np.float32)
    path = write_volume(tmp_path / "v.mrc", vol, 1.25)
    with mrcfile.open(path, permissive=False) as mrc:
        assert mrc.header.ispg == 1 and mrc.is_volume() and mrc.header.mode == 2
    got, apix = read_volume(path)
    assert got.dtype == np.float32 and apix == pytest.approx(1.25)
    np.testing.assert_array_equal(got, vol)

    path2 = write_volume(tmp_path / "mask.mrc", (vol > 0).astype(np.float32))
    got, apix = read_volume(path2)
    assert apix is None and set(np.unique(got)) == {0.0, 1.0}

    with pytest.raises(FileExistsError, match="v.mrc"):
        write_volume(path, vol, 1.0)
    with pytest.raises(ValueError, match="3-D"):
        write_volume(tmp_path / "flat.mrc", vol[0])
    bad = vol.copy()
    bad[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_volume(tmp_path / "nan.mrc", bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.mrc", "v.mrc"]


def test_read_volume_errors(tmp_path, rng, shared_data):
    vol, apix = read_volume(shared_data / "relion_sim" / "ref.mrc")
    assert vol.shape == (64, 64, 64) and apix == pytest.approx(4.0)
    img = _raw_stack(tmp_path / "img.mrc", rng.standard_normal((8, 8)))
    with pytest.raises(ValueError, match="img.mrc: holds a 2-D image"):
        read_volume(img)
    cut = tmp_path / "cut.mrc"
    shutil.copyfile(shared_data / "relion_sim" / "ref.mrc", cut)
    with open(cut, "r+b") as fh:
        fh.truncate(5000)
    with pytest.raises(ValueError, match=r"cut\.mrc: not a readable MRC file \(truncated\?\)"):
        read_volume(cut)


# ------------------------------------------------------------------ pre-MRC2014 headers (issue 12, item 2)
def test_old_header_stack_from_cryodrgn_is_read(test_data):
    """cryoDRGN's hand.5.mrcs has no 'MAP ' ID and machine stamp 0 (as RELION and mrcfile's permissive mode
    accept): read it, with the dimensions and pixels its own header bytes give."""
    path = test_data / "cryodrgn" / "hand.5.mrcs"
    raw = path.read_bytes()
    assert raw[208:212] != b"MAP "                                          # really an old header
    nx, ny, nz, mode = np.frombuffer(raw[:16], dtype="<i4")
    assert mode == 2
    expected = np.frombuffer(raw[1024:], dtype="<f4").reshape(nz, ny, nx)
    stack = read_mrc_stack(path)
    assert (len(stack), stack.box) == (nz, nx) and not stack.has_poses
    np.testing.assert_array_equal(stack.read_images(), expected)
    np.testing.assert_array_equal(MrcStackImages([(path, 4), (path, 0)], "x.star").read(np.arange(2)),
                                  expected[[4, 0]])


def test_old_header_garbage_is_still_refused(test_data, tmp_path):
    raw = bytearray((test_data / "cryodrgn" / "hand.5.mrcs").read_bytes())
    short = tmp_path / "short.mrcs"
    short.write_bytes(raw[:-100])                                          # size no longer what the header says
    with pytest.raises(ValueError, match=r"short\.mrcs: not a readable MRC file: no 'MAP ' ID.*64 x 64 x 5 "
                                         r"pixels.*82844 bytes"):
        read_mrc_stack(short)
    raw[12:16] = np.int32(77).tobytes()                                    # mode 77
    bad_mode = tmp_path / "mode.mrcs"
    bad_mode.write_bytes(raw)
    with pytest.raises(ValueError, match=r"mode\.mrcs: not a readable MRC file: .*mode 77"):
        read_mrc_stack(bad_mode)
