"""EMAN2/SPARX HDF stacks and volumes: round trips, the exact layout EMAN2 writes, files built the way EMAN2 builds
them, the EMAN2Ctf / EMAN1 ctf strings, and one test per kind of bad input."""
from __future__ import annotations

import os
import pickle
import re

import h5py
import numpy as np
import pytest

from gpu_ali3d.ctf import CTFParams, eman2_ctf_string, parse_eman2_ctf_string
from gpu_ali3d.geometry import eman_transform_from_spider, rotation_matrix
from gpu_ali3d.io.eman_hdf import (HdfImages, _write_attr, is_eman_hdf, read_hdf_stack, read_hdf_volume,
                                   write_hdf_stack, write_hdf_volume)
from gpu_ali3d.io.stack import ArrayImages, ParticleStack

FIELDS = [f"{r}{c}" for r in range(3) for c in range(4)]


# ------------------------------------------------------------------------------------------------------ helpers
def _random_stack(rng, n=7, box=16, ctf=True, apix=1.31):
    poses = np.column_stack([rng.uniform(0, 360, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                             rng.uniform(0, 360, n), rng.normal(0, 3, n), rng.normal(0, 3, n)])
    poses[:3, 1] = [0.0, 180.0, 1e-3][:n]  # gimbal lock and near it
    images = rng.normal(size=(n, box, box)).astype(np.float32)
    params = None
    if ctf:
        u = rng.uniform(8000, 30000, n)
        params = CTFParams(u, u - rng.uniform(0, 800, n), rng.uniform(0, 180, n), 300.0, 2.7, 0.07,
                           rng.uniform(0, 50, n))
    return ParticleStack(ArrayImages(images), poses, apix, params)


def _rotation_error(a, b):
    """Largest difference between the rotation matrices and the shifts of two pose arrays (n, 5)."""
    ra, rb = rotation_matrix(*a[:, :3].T), rotation_matrix(*b[:, :3].T)
    return np.abs(ra - rb).max(), np.abs(a[:, 3:] - b[:, 3:]).max()


def _eman2_spider_transform(phi, theta, psi, s2x, s2y):
    """The 3x4 matrix of SPARX ``set_params_proj``: EMAN2 Transform({"type": "spider", ..., "tx": -s2x,
    "ty": -s2y}), written out from Transform::set_rotation (az = phi + 90, alt = theta, phi_E = psi - 90)."""
    az, alt, ph = np.radians([phi + 90.0, theta, psi - 90.0])
    m = np.zeros((3, 4))
    m[0, :3] = [np.cos(ph) * np.cos(az) - np.cos(alt) * np.sin(az) * np.sin(ph),
                np.cos(ph) * np.sin(az) + np.cos(alt) * np.cos(az) * np.sin(ph), np.sin(alt) * np.sin(ph)]
    m[1, :3] = [-np.sin(ph) * np.cos(az) - np.cos(alt) * np.sin(az) * np.cos(ph),
                -np.sin(ph) * np.sin(az) + np.cos(alt) * np.cos(az) * np.cos(ph), np.sin(alt) * np.cos(ph)]
    m[2, :3] = [np.sin(alt) * np.sin(az), -np.sin(alt) * np.cos(az), np.cos(alt)]
    m[0, 3], m[1, 3] = -s2x, -s2y
    return m


def _eman2_string_attr(group, name, text):
    """A string attribute exactly as HdfIO2::write_attr makes it: H5T_C_S1 of strlen + 1, scalar dataspace."""
    raw = text.encode()
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(raw) + 1)
    attr = h5py.h5a.create(group.id, name.encode(), tid, h5py.h5s.create(h5py.h5s.SCALAR))
    attr.write(np.array(raw + b"\0", dtype=f"S{len(raw) + 1}"), mtype=tid)


def _eman2_transform_attr(group, name, m):
    """A Transform attribute as HdfIO2::write_attr makes it: H5Tcreate(COMPOUND, 48) + H5Tinsert of each field."""
    tid = h5py.h5t.create(h5py.h5t.COMPOUND, 48)
    for k, field in enumerate(FIELDS):
        tid.insert(field.encode(), 4 * k, h5py.h5t.NATIVE_FLOAT)
    tid.pack()
    attr = h5py.h5a.create(group.id, name.encode(), tid, h5py.h5s.create_simple((1,)))
    attr.write(np.ascontiguousarray(m, dtype=np.float32).reshape(1, 12).view(
        np.dtype([(f, "<f4") for f in FIELDS])).reshape(1), mtype=tid)


def _eman2_number_attr(group, name, value, dtype):
    group.attrs.create(name, np.array([value], dtype=dtype))  # simple dataspace of one element, as EMAN2


def _eman2_file(path, images, *, xforms=None, ctfs=None, extra=None, imageid_max=True):
    """An HDF file in EMAN2's layout from (data, header) pieces, written with h5py directly (not our writer).

    images : list of numpy arrays (stored with their dtype; uint8/uint16 chunked and deflated as EMAN2's
    compressed mode). xforms : list of 3x4 matrices or None per image. ctfs : list of strings or None per image.
    extra : list of dicts {name: (value, dtype)} of further attributes per image.
    """
    with h5py.File(path, "w") as f:
        grp = f.create_group("MDF").create_group("images")
        if imageid_max:
            _eman2_number_attr(grp, "imageid_max", len(images) - 1, np.int32)
        for i, data in enumerate(images):
            g = grp.create_group(str(i))
            if data.dtype in (np.uint8, np.uint16):
                g.create_dataset("image", data=data, chunks=(min(8, data.shape[0]), data.shape[1]),
                                 compression="gzip", compression_opts=1)
            else:
                g.create_dataset("image", data=data)
            _eman2_number_attr(g, "EMAN.nx", data.shape[-1], np.int32)
            _eman2_number_attr(g, "EMAN.ny", data.shape[-2], np.int32)
            _eman2_number_attr(g, "EMAN.apix_x", 1.0, np.float32)  # EMData's default, not the real pixel size
            if xforms is not None and xforms[i] is not None:
                _eman2_transform_attr(g, "EMAN.xform.projection", xforms[i])
            if ctfs is not None and ctfs[i] is not None:
                _eman2_string_attr(g, "EMAN.ctf", ctfs[i])
            for name, (value, dtype) in (extra[i] if extra else {}).items():
                if dtype is str:
                    _eman2_string_attr(g, name, value)
                else:
                    _eman2_number_attr(g, name, value, dtype)


def _leftovers(directory, keep):
    return sorted(set(os.listdir(directory)) - set(keep))


# ------------------------------------------------------------------------------------------------- round trips
def test_stack_round_trip(tmp_path, rng):
    stack = _random_stack(rng)
    path = tmp_path / "stack.hdf"
    write_hdf_stack(stack, path)
    back = read_hdf_stack(path)

    assert len(back) == len(stack) and back.box == stack.box
    np.testing.assert_array_equal(back.read_images(), stack.read_images())
    # Poses pass through float32 matrices: compare matrices, not Euler angles (theta = 0 is ill-conditioned).
    # float32 rounding is ~6e-8 per element; 1e-6 in a matrix element is ~6e-5 degrees.
    rot_err, shift_err = _rotation_error(back.poses, stack.poses)
    assert rot_err < 1e-6 and shift_err < 1e-4
    # EMAN2Ctf strings keep 10 significant digits (%1.10g).
    assert back.ctf.allclose(stack.ctf, rtol=1e-8, atol=1e-6)
    assert back.apix_A == pytest.approx(stack.apix_A, rel=1e-9)
    assert back.image_refs == [f"{i + 1}@{path}" for i in range(len(stack))]
    assert is_eman_hdf(path)


def test_stack_round_trip_without_ctf_keeps_apix_x(tmp_path, rng):
    stack = _random_stack(rng, n=3, box=8, ctf=False, apix=2.5)
    path = tmp_path / "noctf.hdf"
    write_hdf_stack(stack, path)
    back = read_hdf_stack(path)
    assert back.ctf is None
    assert back.apix_A == 2.5
    assert _rotation_error(back.poses, stack.poses)[0] < 1e-6


def test_hdf_images_reads_any_order_and_pickles(tmp_path, rng):
    stack = _random_stack(rng, n=9, box=8)
    path = tmp_path / "s.hdf"
    write_hdf_stack(stack, path)
    images = read_hdf_stack(path).images
    assert isinstance(images, HdfImages)
    idx = np.array([8, 0, 3, 3])
    want = stack.read_images(idx)
    np.testing.assert_array_equal(images.read(idx), want)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(images)).read(idx), want)
    assert images.read(np.array([], dtype=int)).shape == (0, 8, 8)
    with pytest.raises(IndexError, match="out of range"):
        images.read(np.array([9]))


def test_hdf_to_hdf_copy_reads_source_in_chunks(tmp_path, rng, monkeypatch):
    import gpu_ali3d.io.eman_hdf as eman_hdf
    monkeypatch.setattr(eman_hdf, "_CHUNK_BYTES", 3 * 8 * 8 * 4)  # 3 images per chunk: several chunks
    stack = _random_stack(rng, n=8, box=8)
    write_hdf_stack(stack, tmp_path / "a.hdf")
    write_hdf_stack(read_hdf_stack(tmp_path / "a.hdf"), tmp_path / "b.hdf")
    back = read_hdf_stack(tmp_path / "b.hdf")
    np.testing.assert_array_equal(back.read_images(), stack.read_images())
    assert back.ctf.allclose(stack.ctf, rtol=1e-8, atol=1e-6)


def test_volume_round_trip(tmp_path, rng):
    vol = rng.normal(size=(6, 5, 4)).astype(np.float32)
    write_hdf_volume(tmp_path / "v.hdf", vol, 2.25)
    back, apix = read_hdf_volume(tmp_path / "v.hdf")
    assert back.dtype == np.float32 and back.shape == (6, 5, 4)
    np.testing.assert_array_equal(back, vol)
    assert apix == 2.25
    write_hdf_volume(tmp_path / "w.hdf", vol)
    assert read_hdf_volume(tmp_path / "w.hdf")[1] is None
    with h5py.File(tmp_path / "v.hdf", "r") as f:
        g = f["MDF/images/0"]
        assert g["image"].shape == (6, 5, 4) and g["image"].dtype == np.float32
        assert [int(g.attrs[f"EMAN.n{a}"][0]) for a in "xyz"] == [4, 5, 6]
        assert int(f["MDF/images"].attrs["imageid_max"][0]) == 0


# ------------------------------------------------------------------------------------------------------ layout
def test_written_layout_is_eman2s(tmp_path, rng):
    stack = _random_stack(rng, n=4, box=12)
    path = tmp_path / "layout.hdf"
    write_hdf_stack(stack, path)
    assert open(path, "rb").read(9)[8] == 0  # superblock version 0, readable by every HDF5 EMAN2 links

    with h5py.File(path, "r") as f:
        assert list(f.keys()) == ["MDF"] and list(f["MDF"].keys()) == ["images"]
        images = f["MDF/images"]
        assert sorted(images.keys(), key=int) == ["0", "1", "2", "3"]
        imax = images.attrs["imageid_max"]
        assert imax.dtype == np.int32 and imax.shape == (1,) and imax[0] == 3
        matrices = eman_transform_from_spider(stack.poses)
        for i in range(4):
            g = images[str(i)]
            ds = g["image"]
            assert ds.dtype == np.dtype("<f4") and ds.shape == (12, 12)
            assert ds.chunks is None and ds.compression is None  # contiguous, as EMAN2's float images
            np.testing.assert_array_equal(ds[()], stack.read_images([i])[0])

            ints = ["nx", "ny", "nz", "datatype", "changecount", "is_complex", "is_complex_x", "is_complex_ri"]
            floats = ["apix_x", "apix_y", "apix_z", "minimum", "maximum", "mean", "sigma", "square_sum"]
            for key in ints + floats:
                a = g.attrs["EMAN." + key]
                assert a.shape == (1,), key
                assert a.dtype == (np.int32 if key in ints else np.float32), key
            assert [g.attrs[f"EMAN.{k}"][0] for k in ("nx", "ny", "nz", "datatype", "is_complex_ri")] == \
                [12, 12, 1, 7, 1]
            assert g.attrs["EMAN.apix_x"][0] == np.float32(stack.apix_A)
            assert g.attrs["EMAN.mean"][0] == pytest.approx(ds[()].mean(), abs=1e-6)

            x = g.attrs["EMAN.xform.projection"]
            assert x.shape == (1,) and x.dtype.names == tuple(FIELDS) and x.dtype.itemsize == 48
            assert all(x.dtype.fields[name][0] == np.dtype("<f4") and x.dtype.fields[name][1] == 4 * k
                       for k, name in enumerate(FIELDS))
            np.testing.assert_array_equal(np.array([x[0][name] for name in FIELDS]),
                                          matrices[i].astype(np.float32).reshape(-1))
            # set_params_proj stores translation (-s2x, -s2y, 0)
            assert x[0]["03"] == np.float32(-stack.poses[i, 3]) and x[0]["23"] == 0

            attr = h5py.h5a.open(g.id, b"EMAN.ctf")
            tid = attr.get_type()
            text = eman2_ctf_string(stack.ctf, i, stack.apix_A)
            assert tid.get_class() == h5py.h5t.STRING and not tid.is_variable_str()
            assert tid.get_strpad() == h5py.h5t.STR_NULLTERM and tid.get_cset() == h5py.h5t.CSET_ASCII
            assert tid.get_size() == len(text) + 1 and attr.shape == ()  # NUL-terminated, scalar dataspace
            assert g.attrs["EMAN.ctf"].decode() == text


def test_attribute_types_follow_hdfio2_write_attr(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        g = f.create_group("g")
        _write_attr(g.id, "EMAN.flag", True)
        _write_attr(g.id, "EMAN.off", False)
        _write_attr(g.id, "EMAN.d", np.float64(0.1))
        _write_attr(g.id, "EMAN.f", 0.1)
        _write_attr(g.id, "EMAN.i", 3)
        _write_attr(g.id, "EMAN.fa", np.array([1, 2, 3], dtype=np.float32))
        _write_attr(g.id, "EMAN.i", 4, replace=True)
        with pytest.raises(TypeError, match="no EMAN2 HDF attribute type"):
            _write_attr(g.id, "EMAN.bad", [1, 2])
    with h5py.File(tmp_path / "a.h5", "r") as f:
        a = f["g"].attrs
        # bool: one 1-byte char 'T'/'F' (H5T_NATIVE_CHAR), which EMAN2's read_attr turns back into a bool
        assert a["EMAN.flag"].dtype == np.int8 and a["EMAN.flag"].shape == (1,) and a["EMAN.flag"][0] == ord("T")
        assert a["EMAN.off"][0] == ord("F")
        assert a["EMAN.d"].dtype == np.float64 and a["EMAN.d"][0] == 0.1
        assert a["EMAN.f"].dtype == np.float32
        assert a["EMAN.i"].dtype == np.int32 and a["EMAN.i"][0] == 4
        assert a["EMAN.fa"].shape == (3,)


# --------------------------------------------------------------------------------- files as EMAN2 writes them
def test_reads_hand_built_eman2_file_with_compressed_images(tmp_path, rng):
    """Compressed uint8 (8 bits) and uint16 (12 bits) images, a float image, EMAN2Ctf strings with background
    and SNR arrays, an EMAN1 string, Transforms built field by field as HdfIO2 builds them."""
    box = 10
    raw8 = rng.integers(0, 256, (box, box)).astype(np.uint8)
    raw12 = rng.integers(0, 4096, (box, box)).astype(np.uint16)
    plain = rng.normal(size=(box, box)).astype(np.float32)
    poses = np.array([[10.0, 20.0, 30.0, 1.5, -2.0], [200.0, 0.0, 75.0, 0.0, 0.25], [300.0, 180.0, 5.0, -3.0, 3.0]])
    xforms = [_eman2_spider_transform(*p) for p in poses]
    ctfs = ["E2.5 0.1 45 0 10 300 2.7 1.2 0 3,0.1,0.2,0.3 2,1,0.5",
            "E1.75 0 0 80 7 200 2 1.2 0.001 0 0",
            "O-2.5 10 1 0.1 0 0 0 0 300 2.7 1.2"]
    extra = [{"EMAN.stored_renderbits": (8, np.int32), "EMAN.stored_rendermin": (-1.5, np.float32),
              "EMAN.stored_rendermax": (2.25, np.float32), "EMAN.stored_truncated": (0, np.int32),
              "EMAN.ptcl_source_image": ("mic_001.hdf", str)},
             {"EMAN.stored_renderbits": (12, np.int32), "EMAN.stored_rendermin": (-3.0, np.float32),
              "EMAN.stored_rendermax": (5.0, np.float32)},
             {}]
    path = tmp_path / "eman2.hdf"
    _eman2_file(path, [raw8, raw12, plain], xforms=xforms, ctfs=ctfs, extra=extra)

    stack = read_hdf_stack(path)
    assert len(stack) == 3 and stack.box == box
    got = stack.read_images()
    # HdfIO2::read_data: v / (2^bits - 1) * (max - min) + min, in float32
    np.testing.assert_allclose(got[0], raw8 / np.float32(255) * np.float32(3.75) + np.float32(-1.5), rtol=0,
                               atol=1e-6)
    np.testing.assert_allclose(got[1], raw12 / np.float32(4095) * np.float32(8.0) + np.float32(-3.0), rtol=0,
                               atol=2e-6)
    np.testing.assert_array_equal(got[2], plain)
    assert got[0].min() >= -1.5 - 1e-6 and got[0].max() <= 2.25 + 1e-6

    # get_params_proj: the SPIDER angles and s2x = -tx of the Transform EMAN2 built
    rot_err, shift_err = _rotation_error(stack.poses, poses)
    assert rot_err < 1e-6 and shift_err < 1e-6

    want = CTFParams([25500.0, 17500.0, 25000.0], [24500.0, 17500.0, 25000.0], [45.0, 0.0, 0.0],
                     [300.0, 200.0, 300.0], [2.7, 2.0, 2.7], [0.10, 0.07, 0.10], [0.0, 80.0, 40.0])
    assert stack.ctf.allclose(want, rtol=1e-9, atol=1e-9)
    assert stack.apix_A == 1.2  # the CTF's pixel size, not the default apix_x = 1.0


def test_reads_file_without_imageid_max(tmp_path, rng):
    path = tmp_path / "old.hdf"
    _eman2_file(path, [np.zeros((4, 4), np.float32)] * 2, xforms=[_eman2_spider_transform(0, 0, 0, 0, 0)] * 2,
                imageid_max=False)
    assert len(read_hdf_stack(path)) == 2


def test_is_eman_hdf(tmp_path, rng):
    write_hdf_stack(_random_stack(rng, n=2, box=4), tmp_path / "a.hdf")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    (tmp_path / "text.hdf").write_text("not hdf")
    assert is_eman_hdf(tmp_path / "a.hdf")
    assert not is_eman_hdf(tmp_path / "plain.h5")
    assert not is_eman_hdf(tmp_path / "text.hdf")
    assert not is_eman_hdf(tmp_path / "missing.hdf")


# ----------------------------------------------------------------------------------------------- ctf strings
def test_eman2_ctf_string_layout_is_eman2ctf_to_string():
    ctf = CTFParams([21000.0], [19000.0], [30.0], [300.0], [2.7], [0.1], [12.5])
    text = eman2_ctf_string(ctf, 0, 1.5)
    # "E%1.10g %1.10g ... %1.10g %d" (9 scalars, background count), then " %d" (SNR count): spaces, not commas
    assert text == "E2 0.2 30 12.5 10 300 2.7 1.5 0 0 0"
    back, apix = parse_eman2_ctf_string(text)
    assert back.allclose(ctf, rtol=1e-9) and apix == 1.5


def test_parse_real_eman2ctf_strings():
    ctf, apix = parse_eman2_ctf_string("E1.234567891 -0.05 170.5 100 10 300 2.7 0.9 0.002 2,0.5,1e+03 0")
    assert ctf.defocus_u_A[0] == pytest.approx(12095.67891) and ctf.defocus_v_A[0] == pytest.approx(12595.67891)
    assert ctf.astig_angle_deg[0] == 170.5 and ctf.bfactor_A2[0] == 100 and apix == 0.9
    # the SNR part may be missing: EMAN2Ctf::from_string accepts that
    assert parse_eman2_ctf_string("E2 0 0 0 10 300 2.7 1 0 0")[1] == 1.0


def test_parse_eman1_ctf_string_converts_as_eman1ctf_from_string():
    # EMAN1: defocus negative for underfocus, B with exp(-B s^2) (EMAN2's is 4x), ampcont a fraction
    ctf, apix = parse_eman2_ctf_string("O-1.8 25 1.3 0.07 0 0 0 0 200 2.1 1.7")
    want = CTFParams([18000.0], [18000.0], [0.0], [200.0], [2.1], [0.07], [100.0])
    assert ctf.allclose(want, rtol=1e-12) and apix == 1.7


@pytest.mark.parametrize("text, problem", [
    ("E2,0,0,0,10,300,2.7,1.5,0,0,0", "fields"),                  # comma-separated scalars: not EMAN2's
    ("E2 0 0 0 10 300 2.7 1.5 0 3,0.1,0.2 0", "3 values but holds 2"),
    ("E2 0 0 0 10 300 x 1.5 0 0 0", "could not convert"),
    ("E2 0 0 0 150 300 2.7 1.5 0 0 0", "amplitude contrast"),
    ("O-1.8 25 1.3", "expected 11 numbers"),
    ("X1 2 3", "expected EMAN2Ctf"),
])
def test_parse_bad_ctf_strings(text, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_eman2_ctf_string(text)


# ------------------------------------------------------------------------------------------------- bad input
def _pose(i=0):
    return _eman2_spider_transform(10.0 * i, 30.0, 0.0, 0.0, 0.0)


def test_non_square_image(tmp_path):
    path = tmp_path / "rect.hdf"
    _eman2_file(path, [np.zeros((8, 10), np.float32)], xforms=[_pose()])
    with pytest.raises(ValueError, match=re.escape(f"{path}: image 0") + ".*10 x 8 pixels.*must be square"):
        read_hdf_stack(path)


def test_images_of_different_sizes(tmp_path):
    path = tmp_path / "sizes.hdf"
    _eman2_file(path, [np.zeros((8, 8), np.float32), np.zeros((10, 10), np.float32)], xforms=[_pose(), _pose(1)])
    with pytest.raises(ValueError, match=re.escape(f"{path}: image 1") + ".*10 x 10.*image 0 is 8 x 8.*one box size"):
        read_hdf_stack(path)


def test_missing_xform_projection_names_the_image(tmp_path):
    path = tmp_path / "nopose.hdf"
    _eman2_file(path, [np.zeros((4, 4), np.float32)] * 3, xforms=[_pose(), _pose(1), None])
    with pytest.raises(ValueError, match=re.escape(f"{path}: image 2 (/MDF/images/2) has no EMAN.xform.projection")):
        read_hdf_stack(path)


def test_scaled_or_non_transform_xform_projection(tmp_path):
    path = tmp_path / "scaled.hdf"
    _eman2_file(path, [np.zeros((4, 4), np.float32)] * 2, xforms=[_pose(), 2.0 * _pose(1)])
    with pytest.raises(ValueError, match=re.escape(f"{path}: xform.projection of image 1 is not a pure rotation")):
        read_hdf_stack(path)
    path = tmp_path / "floats.hdf"
    _eman2_file(path, [np.zeros((4, 4), np.float32)], xforms=[None],
                extra=[{"EMAN.xform.projection": (1.0, np.float32)}])
    with pytest.raises(ValueError, match=re.escape(f"{path}: image 0 (/MDF/images/0): EMAN.xform.projection is "
                                                   "not an EMAN2 Transform")):
        read_hdf_stack(path)


def test_unparsable_ctf_names_the_image(tmp_path):
    path = tmp_path / "badctf.hdf"
    _eman2_file(path, [np.zeros((4, 4), np.float32)] * 2, xforms=[_pose(), _pose(1)],
                ctfs=["E2 0 0 0 10 300 2.7 1 0 0 0", "E2 0 zero 0 10 300 2.7 1 0 0 0"])
    with pytest.raises(ValueError, match=re.escape(f"{path}: image 1 (/MDF/images/1): EMAN.ctf: unparsable ctf")):
        read_hdf_stack(path)


def test_ctf_on_some_images_only(tmp_path):
    path = tmp_path / "somectf.hdf"
    _eman2_file(path, [np.zeros((4, 4), np.float32)] * 2, xforms=[_pose(), _pose(1)],
                ctfs=["E2 0 0 0 10 300 2.7 1 0 0 0", None])
    with pytest.raises(ValueError, match=re.escape(f"{path}: image 1 (/MDF/images/1) has no EMAN.ctf but image 0")):
        read_hdf_stack(path)


def test_truncated_or_corrupt_file(tmp_path, rng):
    path = tmp_path / "trunc.hdf"
    write_hdf_stack(_random_stack(rng, n=4, box=16), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = re.escape(f"{path}: not a readable HDF5 file (truncated or corrupt?)")
    with pytest.raises(ValueError, match=message):
        read_hdf_stack(path)
    garbage = tmp_path / "garbage.hdf"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match=re.escape(f"{garbage}: not a readable HDF5 file")):
        read_hdf_stack(garbage)
    with pytest.raises(ValueError, match=re.escape(f"{garbage}: not a readable HDF5 file")):
        read_hdf_volume(garbage)


def test_file_without_mdf_images(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match=re.escape(f"{path}: no /MDF/images group")):
        read_hdf_stack(path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: no /MDF/images group")):
        read_hdf_volume(path)


def test_missing_image_group(tmp_path):
    path = tmp_path / "gap.hdf"
    _eman2_file(path, [np.zeros((4, 4), np.float32)] * 2, xforms=[_pose(), _pose(1)])
    with h5py.File(path, "a") as f:
        f["MDF/images"].attrs["imageid_max"] = np.array([2], np.int32)
    with pytest.raises(ValueError, match=re.escape(f"{path}: image 2 (/MDF/images/2/image) is missing")):
        read_hdf_stack(path)


def test_nan_pixels_reported_at_read_time(tmp_path):
    path = tmp_path / "nan.hdf"
    images = [np.zeros((4, 4), np.float32) for _ in range(3)]
    images[1][2, 3] = np.nan
    _eman2_file(path, images, xforms=[_pose(), _pose(1), _pose(2)])
    stack = read_hdf_stack(path)  # headers are fine; pixels are checked as they are read
    stack.read_images([0, 2])
    with pytest.raises(ValueError, match=re.escape(f"{path}: image 2 (1-based) contains NaN or inf")):
        stack.read_images()


def test_volume_errors(tmp_path, rng):
    stack_path = tmp_path / "stack.hdf"
    write_hdf_stack(_random_stack(rng, n=2, box=4), stack_path)
    with pytest.raises(ValueError, match=re.escape(f"{stack_path}: image 0 (/MDF/images/0) has shape (4, 4)") +
                       ".*not a 3-D volume"):
        read_hdf_volume(stack_path)
    vol = np.zeros((4, 4, 4), np.float32)
    write_hdf_volume(tmp_path / "v.hdf", vol)
    with pytest.raises(ValueError, match="particle images must be 2-D"):
        read_hdf_stack(tmp_path / "v.hdf")


def test_write_refuses_existing_path_and_leaves_it_untouched(tmp_path, rng):
    path = tmp_path / "out.hdf"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=re.escape(str(path))):
        write_hdf_stack(_random_stack(rng, n=2, box=4), path)
    with pytest.raises(FileExistsError, match=re.escape(str(path))):
        write_hdf_volume(path, np.zeros((2, 2, 2), np.float32))
    assert path.read_bytes() == b"precious"
    assert _leftovers(tmp_path, ["out.hdf"]) == []
    write_hdf_stack(_random_stack(rng, n=2, box=4), path, overwrite=True)
    assert len(read_hdf_stack(path)) == 2


def test_failed_write_leaves_nothing(tmp_path, rng):
    stack = _random_stack(rng, n=5, box=4)
    bad = stack.read_images()
    bad[3, 0, 0] = np.inf
    stack.images = ArrayImages(bad)
    with pytest.raises(ValueError, match="image 4 .1-based. contains NaN or inf"):
        write_hdf_stack(stack, tmp_path / "out.hdf")
    vol = np.zeros((3, 3, 3), np.float32)
    vol[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'vol.hdf'}: the volume contains NaN")):
        write_hdf_volume(tmp_path / "vol.hdf", vol)
    with pytest.raises(ValueError, match="must be a 3-D array"):
        write_hdf_volume(tmp_path / "vol.hdf", np.zeros((3, 3), np.float32))
    assert _leftovers(tmp_path, []) == []


def test_half_sets_and_classes_survive_star_to_hdf(tmp_path, shared_data):
    """issue 12 item 10: rlnRandomSubset and rlnClassNumber from a STAR file come back from the .hdf."""
    import starfile
    from gpu_ali3d.io.star import read_star

    star_path = shared_data / "relion_sim" / "clean" / "sim.star"
    table = starfile.read(star_path, always_dict=True)["particles"]
    stack = read_star(star_path)
    stack.meta["rlnClassNumber"] = np.arange(len(stack)) % 3 + 1
    write_hdf_stack(stack, tmp_path / "s.hdf")
    back = read_hdf_stack(tmp_path / "s.hdf")
    np.testing.assert_array_equal(back.meta["rlnRandomSubset"], table["rlnRandomSubset"])
    np.testing.assert_array_equal(back.meta["rlnClassNumber"], np.arange(len(stack)) % 3 + 1)
    with h5py.File(tmp_path / "s.hdf", "r") as f:
        assert f["MDF/images/5"].attrs["EMAN.rlnRandomSubset"].dtype == np.int32
