"""EMAN2/SPARX HDF5 particle stacks and volumes, laid out as EMAN2's ``HdfIO2`` (libEM/io/hdfio2.cpp) lays them out.

Layout (what EMAN2 writes and reads):

* Image i (0-based) is the dataset ``/MDF/images/<i>/image``: numpy (ny, nx) for a 2-D image, (nz, ny, nx) for a
  volume; float32, or uint8/uint16 in EMAN2's "compressed" mode (below). The group ``/MDF/images`` carries the
  int32 attribute ``imageid_max``, the highest image index in the file.
* Image i's header values are attributes of the *group* ``/MDF/images/<i>`` named ``EMAN.<key>``, stored as
  ``HdfIO2::write_attr`` stores each EMObject type: int -> int32, float -> float32, double -> float64, bool -> one
  signed char 'T' or 'F' (all four in a 1-D dataspace of one element); string -> fixed-length NUL-terminated
  ASCII string (size strlen + 1) in a scalar dataspace; Transform -> a 1-D dataspace of one element of a packed
  compound of 12 float32 fields "00", "01", ..., "23", the 3x4 matrix [R | t] rows first.
* ``EMAN.xform.projection`` is SPARX's projection pose: R is the SPIDER matrix of (phi, theta, psi) and
  t = (-sx, -sy, 0) (``set_params_proj`` / ``get_params_proj``); see :mod:`gpu_ali3d.geometry`.
* ``EMAN.ctf`` is an ``EMAN2Ctf::to_string`` string (``E...``) or an EMAN1 one (``O...``); see
  :func:`gpu_ali3d.ctf.parse_eman2_ctf_string`.
* Compressed mode (``HdfIO2::write_data`` with EM_COMPRESSED): the dataset is uint8/uint16 (chunked, deflated) and
  the group has ``EMAN.stored_renderbits`` (int b), ``EMAN.stored_rendermin``/``rendermax`` (float); a stored
  value v means ``v / (2**b - 1) * (max - min) + min`` (``HdfIO2::read_data``). We read it; we always write float32.

Image indices in messages are EMAN2's 0-based group numbers and are shown with their HDF path (``/MDF/images/3``);
image references (``ParticleStack.image_refs``) are RELION-style 1-based ``"<i+1>@<path>"``. The half set and the
3-D class (``meta`` ``rlnRandomSubset``, ``rlnClassNumber``) are kept as int attributes of those names.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterator

import h5py
import numpy as np

from ..ctf import CTFParams, eman2_ctf_string, parse_eman2_ctf_string
from ..geometry import eman_transform_from_spider, spider_from_eman_transform
from .atomic import atomic_path
from .stack import ParticleStack, check_finite

#: The group that holds the images (``HdfIO2::init``).
IMAGES_GROUP = "MDF/images"

#: EMAN2's Transform attribute type: 12 packed float32 fields, the 3x4 matrix rows first (``HdfIO2::write_attr``).
TRANSFORM_DTYPE = np.dtype([(f"{r}{c}", "<f4") for r in range(3) for c in range(4)])
_TRANSFORM_TID = h5py.h5t.py_create(TRANSFORM_DTYPE)

_PREFIX = "EMAN."
_EM_FLOAT = 7  # EMUtil::EM_FLOAT, the "datatype" EMData::write_image records for float32 data
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: HDF5 file-format bounds for writing: the oldest format for each object, nothing newer than HDF5 1.8's, so any
#: EMAN2 build (HDF5 1.8 and later) reads our files (superblock version 0, as EMAN2's own files).
_LIBVER = ("earliest", "v108")
#: Images per chunk when writing: about this many bytes of float32 pixels in memory at once.
_CHUNK_BYTES = 256 << 20
#: Relative spread of per-image pixel sizes (from the ctf strings) accepted as one pixel size.
_APIX_RTOL = 1e-4
#: Integer per-particle values kept through HDF files as ``EMAN.<label>`` int attributes (RELION's labels, since
#: neither EMAN2 nor SPARX has a header key of that meaning): the half set (1/2) and the 3-D class (from 1).
META_INT_KEYS = ("rlnRandomSubset", "rlnClassNumber")


# ---------------------------------------------------------------------------------------------------- stacks
class HdfImages:
    """The 2-D images of an EMAN2 HDF file, read on demand (the :class:`~gpu_ali3d.io.stack.ImageSource` protocol).

    The file is opened once per :meth:`read` call, so a stack larger than memory is processed chunk by chunk and
    the object can be pickled to worker processes. Build it with :func:`read_hdf_stack`, which checks that all n
    images exist and are box x box.

    Parameters
    ----------
    path : the HDF file.
    n : number of images (``imageid_max + 1``).
    box : image side in pixels.
    """

    def __init__(self, path: str | os.PathLike, n: int, box: int):
        self.path = os.fspath(path)
        self.n = int(n)
        self.box = int(box)

    def __len__(self) -> int:
        return self.n

    def read(self, indices: np.ndarray) -> np.ndarray:
        """float32 (k, box, box) images for integer ``indices`` (0-based), rescaled if stored compressed.

        Raises ValueError naming the file and image for NaN/inf pixels, a changed or unreadable file; IndexError
        for an index outside 0..n-1.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            bad = int(idx[(idx < 0) | (idx >= self.n)][0])
            raise IndexError(f"{self.path}: image index {bad} out of range for {self.n} images")
        out = np.empty((len(idx), self.box, self.box), dtype=np.float32)
        if not len(idx):
            return out
        with _open_hdf(self.path) as f:
            images = _images_group(f, self.path)
            for k, i in enumerate(idx):
                gid, dataset = _open_image(images, int(i), self.path)
                _read_image_into(gid, dataset, int(i), self.path, out[k])
        check_finite(out, self.path, idx)
        return out


def read_hdf_stack(path: str | os.PathLike) -> ParticleStack:
    """Read an EMAN2/SPARX HDF particle stack: images lazily, poses, CTF and pixel size from the headers.

    Parameters
    ----------
    path : an HDF5 file in EMAN2's layout (module docstring).

    Returns
    -------
    ParticleStack with ``images`` an :class:`HdfImages`; ``poses`` float64 (n, 5) from ``EMAN.xform.projection``
    as SPARX's ``get_params_proj`` gives them (phi, theta, psi in degrees, SPIDER ZYZ; sx = -tx, sy = -ty in
    pixels); ``ctf`` from ``EMAN.ctf`` (None when no image has one); ``apix_A`` the CTF's pixel size when there is
    a CTF (SPARX computes the CTF with it), else ``EMAN.apix_x`` of image 0, else 1.0; ``image_refs``
    ``"<i+1>@<path>"``; ``meta`` the :data:`META_INT_KEYS` (``EMAN.rlnRandomSubset``, ``EMAN.rlnClassNumber``)
    that every image has.

    Raises
    ------
    ValueError (one line, naming the file and the problem) for a file that is not readable HDF5, has no
    ``/MDF/images``, holds images that are missing, not 2-D, not square or not all one size, an image without
    ``EMAN.xform.projection`` or with a non-rotation Transform, an unparsable ``EMAN.ctf``, a CTF on some images
    but not others, or CTF pixel sizes that differ between images. NaN/inf pixels are reported when read.
    FileNotFoundError if there is no such file.
    """
    path_s = os.fspath(path)
    with _open_hdf(path_s) as f:
        images = _images_group(f, path_s)
        n = _image_count(images, path_s)
        box = None
        xforms = np.empty((n, 3, 4), dtype=np.float64)
        ctf_texts: list[str | None] = []
        apix_x = None
        kept = {k: np.empty(n, dtype=np.float64) for k in META_INT_KEYS}
        for i in range(n):
            gid, dataset = _open_image(images, i, path_s)
            shape = _image_shape(dataset, i, path_s)
            if box is None:
                box = shape[0]
            elif shape != (box, box):
                raise ValueError(f"{path_s}: image {i} (/MDF/images/{i}) is {shape[1]} x {shape[0]} pixels but "
                                 f"image 0 is {box} x {box}; all particles must have one box size "
                                 "(resize them, e.g. e2proc2d.py --clip)")
            xform = _read_transform_attr(gid, "xform.projection", path_s, i)
            if xform is None:
                raise ValueError(f"{path_s}: image {i} (/MDF/images/{i}) has no EMAN.xform.projection; every "
                                 "particle needs a starting pose (SPARX: sxheader.py --params=xform.projection "
                                 "--zero, or an earlier alignment)")
            xforms[i] = xform
            ctf_texts.append(_read_string_attr(gid, "ctf", path_s, i))
            if i == 0:
                apix_x = _read_number_attr(gid, "apix_x", path_s, i)
            for k in list(kept):
                value = _read_number_attr(gid, k, path_s, i)
                if value is None:
                    del kept[k]         # kept only when every image has it
                else:
                    kept[k][i] = value
    box = 1 if box is None else box
    meta = {k: v.astype(np.int64) for k, v in kept.items() if n and np.all(v == np.round(v))}

    poses = _poses_from_transforms(xforms, path_s)
    ctf, ctf_apix = _parse_ctfs(ctf_texts, path_s)
    if ctf_apix is not None:
        apix = ctf_apix
    elif apix_x is not None and np.isfinite(apix_x) and apix_x > 0:
        apix = apix_x
    else:
        apix = 1.0
    return ParticleStack(images=HdfImages(path_s, n, box), poses=poses, apix_A=float(apix), ctf=ctf,
                         image_refs=[f"{i + 1}@{path_s}" for i in range(n)], meta=meta)


def write_hdf_stack(stack: ParticleStack, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write a particle stack as an EMAN2/SPARX HDF file that EMAN2 reads (module docstring for the layout).

    Each image i becomes ``/MDF/images/<i>/image`` (float32, box x box) with the header EMAN2's
    ``EMData::write_image`` gives a float image: ``nx ny nz datatype changecount is_complex is_complex_x
    is_complex_ri all_int`` (int), ``apix_x apix_y apix_z minimum maximum mean sigma square_sum mean_nonzero
    sigma_nonzero`` (float, statistics as ``EMData::update_stat``), ``xform.projection`` (the pose as SPARX's
    ``set_params_proj`` stores it) and, when the stack has a CTF, ``ctf`` (``EMAN2Ctf`` string with the stack's
    pixel size). ``/MDF/images`` gets ``imageid_max = n - 1``.

    Images are read from ``stack.images`` in chunks (bounded memory). The file appears complete or not at all
    (written beside ``path`` and renamed). Raises FileExistsError if ``path`` exists and not ``overwrite``, and
    whatever reading the images raises (e.g. ValueError for NaN pixels); nothing is left behind then.
    """
    n, box = len(stack), stack.box
    xform = _transform_records(eman_transform_from_spider(stack.poses))
    ctf_strings = _ctf_strings(stack.ctf, stack.apix_A) if stack.ctf is not None else None
    apix = np.float32(stack.apix_A)
    kept = {k: np.asarray(stack.meta[k]) for k in META_INT_KEYS if k in stack.meta}
    for k, v in kept.items():
        if not (np.issubdtype(v.dtype, np.number) and np.all(v == np.round(v))):
            raise ValueError(f"{path}: {k} must hold integers to be stored in an HDF header; got {v[:3].tolist()}")
    chunk = max(1, _CHUNK_BYTES // (4 * box * box))
    with atomic_path(path, overwrite=overwrite) as tmp:
        with _new_file(tmp) as f:
            images = f.create_group("MDF").create_group("images")
            _write_attr(images.id, "imageid_max", np.int32(-1))  # as HdfIO2::init, raised once all are written
            for idx, chunk_images in stack.iter_chunks(chunk):
                for k, i in enumerate(idx):
                    header = _float_image_header(chunk_images[k], apix)
                    header["xform.projection"] = xform[i:i + 1]
                    if ctf_strings is not None:
                        header["ctf"] = ctf_strings[i]
                    for key, values in kept.items():
                        header[key] = np.int32(values[i])
                    _write_image(images, int(i), chunk_images[k], header)
            _write_attr(images.id, "imageid_max", np.int32(n - 1), replace=True)


# ---------------------------------------------------------------------------------------------------- volumes
def read_hdf_volume(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """The volume in image 0 of an EMAN2 HDF file.

    Returns
    -------
    vol : float32 (nz, ny, nx), numpy order (z, y, x), rescaled if stored compressed.
    apix_A : ``EMAN.apix_x`` in Angstrom per voxel, or None when the header has none.

    Raises ValueError naming the file for an unreadable file, no ``/MDF/images``, an image 0 that is not 3-D, or
    NaN/inf voxels; FileNotFoundError if there is no such file.
    """
    path_s = os.fspath(path)
    with _open_hdf(path_s) as f:
        images = _images_group(f, path_s)
        gid, dataset = _open_image(images, 0, path_s)
        shape = dataset.shape
        if len(shape) != 3 or min(shape) < 2:
            raise ValueError(f"{path_s}: image 0 (/MDF/images/0) has shape {shape}, not a 3-D volume "
                             "(nz, ny, nx); is this a particle stack?")
        vol = np.empty(shape, dtype=np.float32)
        _read_image_into(gid, dataset, 0, path_s, vol)
        apix = _read_number_attr(gid, "apix_x", path_s, 0)
    if not np.all(np.isfinite(vol)):
        raise ValueError(f"{path_s}: the volume contains NaN or inf voxels")
    return vol, apix


def write_hdf_volume(path: str | os.PathLike, vol: np.ndarray, apix_A: float | None = None, *,
                     overwrite: bool = False) -> None:
    """Write a volume as image 0 of an EMAN2 HDF file (float32 (nz, ny, nx) dataset, EMAN2's float header).

    vol : real array (nz, ny, nx), numpy order (z, y, x). apix_A : voxel size in Angstrom, written as
    ``apix_x/y/z``; None writes no pixel size (EMAN2 then assumes 1.0, and :func:`read_hdf_volume` gives None).
    Atomic; raises FileExistsError if ``path`` exists and not ``overwrite``, ValueError for a bad volume.
    """
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise ValueError(f"{path}: a volume must be a 3-D array (nz, ny, nx), got shape {vol.shape}")
    if not (np.issubdtype(vol.dtype, np.floating) or np.issubdtype(vol.dtype, np.integer)):
        raise TypeError(f"{path}: a volume must hold real numbers, got dtype {vol.dtype}")
    vol = np.ascontiguousarray(vol, dtype=np.float32)
    if not np.all(np.isfinite(vol)):
        raise ValueError(f"{path}: the volume contains NaN or inf voxels (or values beyond float32); not written")
    if apix_A is not None and not (np.isfinite(apix_A) and apix_A > 0):
        raise ValueError(f"{path}: apix_A={apix_A} is not a positive voxel size in Angstrom")
    header = _float_image_header(vol, None if apix_A is None else np.float32(apix_A))
    with atomic_path(path, overwrite=overwrite) as tmp:
        with _new_file(tmp) as f:
            images = f.create_group("MDF").create_group("images")
            _write_attr(images.id, "imageid_max", np.int32(0))
            _write_image(images, 0, vol, header)


@contextmanager
def _new_file(path: Path):
    """A new HDF5 file at ``path`` written through a Python file object (h5py's 'fileobj' driver), not by HDF5's
    own I/O: on a full disk HDF5's writes fail silently at close or leave the library in a state that crashes the
    process at exit (measured on a full tmpfs: SIGSEGV / SIGBUS after the error), while Python's writes raise
    OSError(ENOSPC) that the caller sees, and the process ends normally."""
    with open(path, "w+b") as fo:
        with h5py.File(fo, "w", libver=_LIBVER) as f:
            yield f


def is_eman_hdf(path: str | os.PathLike) -> bool:
    """True if ``path`` is a readable HDF5 file with an ``/MDF/images`` group (EMAN2's layout). Never raises."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != _HDF5_SIGNATURE:
                return False
        with h5py.File(path, "r") as f:
            return isinstance(f.get(IMAGES_GROUP), h5py.Group)
    except (OSError, ValueError, KeyError):
        return False


# ---------------------------------------------------------------------------------------------------- reading
# h5py's low-level calls (h5g, h5d, h5a) are used per image: they cost ~10-30 us where the high-level attribute
# access costs ~100-500 us, which matters for stacks of 10^5 particles.
@contextmanager
def _open_hdf(path: str) -> Iterator[h5py.File]:
    """Open read-only; turn h5py's OSError (bad, truncated file, or failed read) into a one-line ValueError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise ValueError(f"{path}: not a readable HDF5 file (truncated or corrupt?)") from None
    try:
        with f:
            yield f
    except OSError:
        raise ValueError(f"{path}: not a readable HDF5 file (truncated or corrupt?)") from None


def _images_group(f: h5py.File, path: str) -> h5py.Group:
    images = f.get(IMAGES_GROUP)
    if not isinstance(images, h5py.Group):
        raise ValueError(f"{path}: no /MDF/images group, so not an EMAN2/SPARX image file (convert it with EMAN2, "
                         "e.g. e2proc2d.py in.mrcs out.hdf)")
    return images


def _image_count(images: h5py.Group, path: str) -> int:
    """imageid_max + 1, or, when that attribute is missing, one more than the highest numbered image group."""
    if h5py.h5a.exists(images.id, b"imageid_max"):
        return int(np.asarray(images.attrs["imageid_max"]).reshape(-1)[0]) + 1
    numbers = [int(k) for k in images.keys() if k.isdigit()]
    if not numbers:
        raise ValueError(f"{path}: /MDF/images holds no images")
    return max(numbers) + 1


def _open_image(images: h5py.Group, i: int, path: str) -> tuple[h5py.h5g.GroupID, h5py.h5d.DatasetID]:
    """Low-level ids of group /MDF/images/<i> and its dataset ``image``; ValueError if either is missing."""
    try:
        gid = h5py.h5g.open(images.id, str(i).encode())
        return gid, h5py.h5d.open(gid, b"image")
    except (KeyError, ValueError, TypeError):  # h5py raises KeyError or ValueError for a missing object
        pass
    raise ValueError(f"{path}: image {i} (/MDF/images/{i}/image) is missing, though imageid_max says the file "
                     f"holds {_image_count(images, path)} images")


def _image_shape(dataset: h5py.h5d.DatasetID, i: int, path: str) -> tuple[int, int]:
    """(ny, nx) of a 2-D particle image; ValueError for volumes and non-square images."""
    shape = dataset.shape
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise ValueError(f"{path}: image {i} (/MDF/images/{i}) has shape {shape}; particle images must be 2-D "
                         "(a volume is read with read_hdf_volume)")
    if shape[0] != shape[1]:
        raise ValueError(f"{path}: image {i} (/MDF/images/{i}) is {shape[1]} x {shape[0]} pixels; particle images "
                         "must be square (window them, e.g. e2proc2d.py --clip)")
    return int(shape[0]), int(shape[1])


def _read_image_into(gid: h5py.h5g.GroupID, dataset: h5py.h5d.DatasetID, i: int, path: str,
                     out: np.ndarray) -> None:
    """Pixels of image i into ``out`` (float32, C-contiguous, the dataset's size), undoing EMAN2's bit-reduced
    storage as ``HdfIO2::read_data`` does: HDF5 converts the stored integers to float, then
    ``v / (2**bits - 1) * (rendermax - rendermin) + rendermin`` in float32."""
    if math.prod(dataset.shape) != out.size:
        raise ValueError(f"{path}: image {i} (/MDF/images/{i}) has shape {dataset.shape}, expected {out.shape}; the "
                         "file changed after it was opened")
    dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, out, mtype=h5py.h5t.NATIVE_FLOAT)
    bits = _read_number_attr(gid, "stored_renderbits", path, i)
    if bits is None or bits <= 0:
        return
    rmax = _read_number_attr(gid, "stored_rendermax", path, i)
    rmin = _read_number_attr(gid, "stored_rendermin", path, i)
    if rmax is None or rmin is None:
        return  # EMAN2 rescales only when both limits are present
    if bits > 16:
        raise ValueError(f"{path}: image {i} (/MDF/images/{i}) has stored_renderbits={bits:g}; EMAN2 stores at "
                         "most 16 bits per pixel")
    rumax = np.float32((1 << int(bits)) - 1)
    out /= rumax
    out *= np.float32(rmax) - np.float32(rmin)
    out += np.float32(rmin)


def _open_attr(gid: h5py.h5g.GroupID, key: str):
    name = (_PREFIX + key).encode()
    return h5py.h5a.open(gid, name) if h5py.h5a.exists(gid, name) else None


def _read_number_attr(gid: h5py.h5g.GroupID, key: str, path: str, i: int) -> float | None:
    """``EMAN.<key>`` as a float (int, float, double, one element), or None when absent."""
    attr = _open_attr(gid, key)
    if attr is None:
        return None
    if attr.get_type().get_class() not in (h5py.h5t.INTEGER, h5py.h5t.FLOAT) or attr.get_storage_size() == 0 \
            or math.prod(attr.shape) != 1:
        raise ValueError(f"{path}: image {i} (/MDF/images/{i}): EMAN.{key} is not a single number")
    buf = np.empty(attr.shape, dtype=np.float64)
    attr.read(buf, mtype=h5py.h5t.NATIVE_DOUBLE)
    return float(buf.reshape(-1)[0])


def _read_string_attr(gid: h5py.h5g.GroupID, key: str, path: str, i: int) -> str | None:
    """``EMAN.<key>`` as a str (fixed-length, NUL-terminated as EMAN2 writes it, or variable-length), or None."""
    attr = _open_attr(gid, key)
    if attr is None:
        return None
    tid = attr.get_type()
    if tid.get_class() != h5py.h5t.STRING or math.prod(attr.shape) != 1:
        raise ValueError(f"{path}: image {i} (/MDF/images/{i}): EMAN.{key} is not a string")
    if tid.is_variable_str():
        value = h5py.Group(gid).attrs[_PREFIX + key]
        value = np.asarray(value, dtype=object).reshape(-1)[0]
        return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    buf = np.empty(attr.shape, dtype=f"S{tid.get_size()}")
    attr.read(buf, mtype=tid)
    return bytes(buf.reshape(-1)[0]).split(b"\0", 1)[0].decode("ascii", "replace")


def _read_transform_attr(gid: h5py.h5g.GroupID, key: str, path: str, i: int) -> np.ndarray | None:
    """An EMAN2 Transform attribute (one compound of the 12 float32 fields "00".."23") -> float64 (3, 4), or None.

    HDF5 converts the stored compound to TRANSFORM_DTYPE field by field *by name*, so field order does not matter.
    """
    attr = _open_attr(gid, key)
    if attr is None:
        return None
    tid = attr.get_type()
    if tid != _TRANSFORM_TID:  # not EMAN2's exact type: accept any compound that has the 12 fields
        names = ({tid.get_member_name(k).decode() for k in range(tid.get_nmembers())}
                 if tid.get_class() == h5py.h5t.COMPOUND else set())
    else:
        names = set(TRANSFORM_DTYPE.names)
    if not set(TRANSFORM_DTYPE.names) <= names or math.prod(attr.shape) != 1:
        raise ValueError(f"{path}: image {i} (/MDF/images/{i}): EMAN.{key} is not an EMAN2 Transform (expected one "
                         "compound of the 12 float fields 00..23)")
    buf = np.empty(attr.shape, dtype=TRANSFORM_DTYPE)
    attr.read(buf, mtype=_TRANSFORM_TID)
    return buf.reshape(1).view(np.float32).astype(np.float64).reshape(3, 4)


def _poses_from_transforms(m: np.ndarray, path: str) -> np.ndarray:
    """float64 (n, 3, 4) Transforms read from float32 -> poses (n, 5), as ``get_params_proj``.

    The stored matrices are float32, so R R^T = I only to ~1e-7; Euler angles taken from them directly are poorly
    conditioned near theta = 0 and 180 (theta from arccos(R[2, 2]) is off by ~sqrt(2e-7) rad). Each rotation is
    therefore first replaced by the nearest exact rotation (polar decomposition, U V^T of its SVD), in float64.
    Scaled or mirrored Transforms are refused (by ``spider_from_eman_transform``, on the matrices as stored).
    """
    try:
        spider_from_eman_transform(m)  # validates: pure rotations only; its message names the image
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    u, _, vt = np.linalg.svd(m[:, :, :3])
    exact = m.copy()
    exact[:, :, :3] = u @ vt
    return spider_from_eman_transform(exact)


def _parse_ctfs(texts: list[str | None], path: str) -> tuple[CTFParams | None, float | None]:
    """Per-image ctf strings -> (CTFParams of all images, their common pixel size), or (None, None) if none."""
    have = [t is not None for t in texts]
    if not any(have):
        return None, None
    if not all(have):
        missing, present = have.index(False), have.index(True)
        raise ValueError(f"{path}: image {missing} (/MDF/images/{missing}) has no EMAN.ctf but image {present} "
                         "has one; either every particle has CTF parameters or none does")
    unique: dict[str, int] = {}
    parsed: list[tuple[CTFParams, float]] = []
    inverse = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        j = unique.get(text)
        if j is None:
            try:
                parsed.append(parse_eman2_ctf_string(text))
            except ValueError as exc:
                raise ValueError(f"{path}: image {i} (/MDF/images/{i}): EMAN.ctf: {exc}") from None
            j = unique[text] = len(parsed) - 1
        inverse[i] = j
    apix = np.array([a for _, a in parsed])[inverse]
    if not (np.isfinite(apix[0]) and apix[0] > 0):
        raise ValueError(f"{path}: image 0 (/MDF/images/0): the ctf pixel size is {apix[0]:g} A; expected a "
                         "positive number")
    if np.ptp(apix) > _APIX_RTOL * apix[0]:
        a, b = int(np.argmin(apix)), int(np.argmax(apix))
        raise ValueError(f"{path}: the ctf pixel size differs between images ({apix[a]:g} A at image {a}, "
                         f"{apix[b]:g} A at image {b}); a stack must have one pixel size")
    ctf = CTFParams.concatenate([c for c, _ in parsed])[inverse]
    return ctf, float(apix[0])


# ---------------------------------------------------------------------------------------------------- writing
def _write_image(images: h5py.Group, i: int, data: np.ndarray, header: dict) -> None:
    """Group /MDF/images/<i> with its float32 dataset ``image`` (contiguous, as EMAN2's) and EMAN.* attributes."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    gid = h5py.h5g.create(images.id, str(i).encode())
    dataset = h5py.h5d.create(gid, b"image", h5py.h5t.IEEE_F32LE, h5py.h5s.create_simple(data.shape))
    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, data, mtype=h5py.h5t.NATIVE_FLOAT)
    for key in sorted(header):  # EMAN2's Dict is a std::map: keys in name order
        _write_attr(gid, _PREFIX + key, header[key])


def _float_image_header(data: np.ndarray, apix: np.float32 | None) -> dict:
    """The header ``EMData::write_image`` writes for a float32 image: size, type flags, statistics, pixel size."""
    nz, ny, nx = (1,) * (3 - data.ndim) + tuple(data.shape)
    header = {"nx": np.int32(nx), "ny": np.int32(ny), "nz": np.int32(nz), "datatype": np.int32(_EM_FLOAT),
              "changecount": np.int32(0), "is_complex": np.int32(0), "is_complex_x": np.int32(0),
              "is_complex_ri": np.int32(1)}
    if apix is not None:
        header.update(apix_x=apix, apix_y=apix, apix_z=apix)
    header.update(_statistics(data))
    return header


def _statistics(data: np.ndarray) -> dict:
    """The statistics ``EMData::update_stat`` keeps in the header (float32 values, sums in float64)."""
    v = np.asarray(data, dtype=np.float32).reshape(-1)
    n = v.size
    v64 = v.astype(np.float64)
    total = float(v64.sum())
    square_sum = float(np.dot(v64, v64))
    n_nonzero = max(1, int(np.count_nonzero(v)))
    var = (square_sum - total * total / n) / (n - 1) if n > 1 else 0.0
    var_nz = (square_sum - total * total / n_nonzero) / (n_nonzero - 1) if n_nonzero > 1 else 0.0
    return {"minimum": np.float32(v.min()), "maximum": np.float32(v.max()), "mean": np.float32(total / n),
            "sigma": np.float32(np.sqrt(max(var, 0.0))), "square_sum": np.float32(square_sum),
            "mean_nonzero": np.float32(total / n_nonzero), "sigma_nonzero": np.float32(np.sqrt(max(var_nz, 0.0))),
            "all_int": np.int32(bool(np.all(v == np.floor(v))))}


def _transform_records(m: np.ndarray) -> np.ndarray:
    """float (n, 3, 4) matrices -> (n,) records of TRANSFORM_DTYPE (float32, rows first)."""
    flat = np.ascontiguousarray(np.asarray(m).reshape(-1, 12), dtype=np.float32)
    return flat.view(TRANSFORM_DTYPE).reshape(-1)


def _ctf_strings(ctf: CTFParams, apix_A: float) -> list[str]:
    """The EMAN2Ctf string of every particle; each distinct parameter set is formatted once."""
    table = np.stack([ctf.defocus_u_A, ctf.defocus_v_A, ctf.astig_angle_deg, ctf.voltage_kV, ctf.cs_mm,
                      ctf.amp_contrast, ctf.bfactor_A2], axis=1)
    _, first, inverse = np.unique(table, axis=0, return_index=True, return_inverse=True)
    texts = [eman2_ctf_string(ctf, int(j), apix_A) for j in first]
    return [texts[j] for j in np.asarray(inverse).reshape(-1)]



def _write_attr(gid: h5py.h5g.GroupID, name: str, value, *, replace: bool = False) -> None:
    """Store one header value on a group the way ``HdfIO2::write_attr`` stores its EMObject type.

    bool -> signed char 'T'/'F'; np.int32/int -> int32; np.float32/float -> float32; np.float64 -> float64 (each
    in a 1-D dataspace of one element); str -> NUL-terminated fixed-length ASCII string (size strlen + 1) in a
    scalar dataspace; a (1,) array of TRANSFORM_DTYPE -> the Transform compound (1-D, one element); 1-D float32 /
    int32 arrays -> float / int arrays. With ``replace`` an existing attribute of that name is replaced
    (EMAN2 deletes it first too); without, the name must be new (the fast path for fresh groups).
    """
    if isinstance(value, (bool, np.bool_)):
        tid, data = h5py.h5t.NATIVE_INT8, np.array([ord("T" if value else "F")], dtype=np.int8)
    elif isinstance(value, np.ndarray) and value.dtype == TRANSFORM_DTYPE:
        tid, data = _TRANSFORM_TID, np.ascontiguousarray(value).reshape(1)
    elif isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype in (np.float32, np.int32):
        tid = h5py.h5t.NATIVE_FLOAT if value.dtype == np.float32 else h5py.h5t.NATIVE_INT32
        data = np.ascontiguousarray(value)
    elif isinstance(value, str):
        raw = value.encode("ascii")
        if b"\0" in raw:
            raise ValueError(f"header value {name}={value!r} contains a NUL byte")
        tid = h5py.h5t.C_S1.copy()
        tid.set_size(len(raw) + 1)
        tid.set_strpad(h5py.h5t.STR_NULLTERM)
        data = np.array(raw + b"\0", dtype=f"S{len(raw) + 1}")
    elif isinstance(value, np.float64):
        tid, data = h5py.h5t.NATIVE_DOUBLE, np.array([value], dtype=np.float64)
    elif isinstance(value, (np.float32, float)):
        tid, data = h5py.h5t.NATIVE_FLOAT, np.array([value], dtype=np.float32)
    elif isinstance(value, (int, np.integer)):
        if not -2**31 <= int(value) < 2**31:
            raise ValueError(f"header value {name}={value} does not fit EMAN2's 32-bit int")
        tid, data = h5py.h5t.NATIVE_INT32, np.array([value], dtype=np.int32)
    else:
        raise TypeError(f"header value {name}={value!r}: no EMAN2 HDF attribute type for {type(value).__name__}")
    space = h5py.h5s.create(h5py.h5s.SCALAR) if data.ndim == 0 else h5py.h5s.create_simple(data.shape)
    bname = name.encode("ascii")
    if replace and h5py.h5a.exists(gid, bname):
        h5py.h5a.delete(gid, bname)
    h5py.h5a.create(gid, bname, tid, space).write(data, mtype=tid)
