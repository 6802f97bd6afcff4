"""The nn4 / nn4_ctf reference reconstruction: grid layout, SPARX's weighting loop, recovery of known maps from
exact projections (with and without CTF, shifts, symmetry), exact additivity for MPI, and RELION's simulated set."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from gpu_ali3d import ctf as ctf_module
from gpu_ali3d.geometry import euler_from_matrix, relion_to_spider
from gpu_ali3d.projection import project
from gpu_ali3d.reconstruct import (_inverse_centre_window, _neighbour_weights, add, finish, insert, new_accumulator,
                                   reconstruct, reconstruct_halves, slice_transforms)
from gpu_ali3d.simulate import phantom
from gpu_ali3d.symmetry import symmetry_rotations

M = 32
APIX_A = 4.0
#: finufft tolerance for making test data: far below every correlation threshold here, and 3x faster than 1e-9.
EPS = 1e-6


def _uniform_poses(rng, n):
    poses = np.zeros((n, 5))
    rot = Rotation.random(n, random_state=rng).as_matrix()
    poses[:, 0], poses[:, 1], poses[:, 2] = euler_from_matrix(rot)
    return poses


def _sphere(m):
    axis = np.arange(m) - m // 2
    return axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2 < (m // 2) ** 2


def _corr(a, b):
    """Pearson correlation of two maps inside the sphere of radius M/2 (the support that finish keeps)."""
    inside = _sphere(a.shape[0])
    x, y = a[inside] - a[inside].mean(), b[inside] - b[inside].mean()
    return float(x @ y / np.sqrt((x @ x) * (y @ y)))


@pytest.fixture(scope="module")
def data():
    """The phantom, 1500 uniform poses, and its exact projections without and with CTF (4 A/px, 0.5-1.5 um)."""
    rng = np.random.default_rng(11)
    vol = phantom(M).astype(np.float64)
    poses = _uniform_poses(rng, 1500)
    mean_df = rng.uniform(5000, 15000, len(poses))
    ctf = ctf_module.CTFParams(mean_df + 150, mean_df - 150, rng.uniform(0, 180, len(poses)), 300, 2.7, 0.1, 0)
    return {"vol": vol, "poses": poses, "ctf": ctf, "images": project(vol, poses, oversampling_eps=EPS),
            "images_ctf": project(vol, poses, ctf=ctf, apix_A=APIX_A, oversampling_eps=EPS)}


# --------------------------------------------------------------------------------------------- layout and SPARX
def test_grid_layout_and_origin():
    """A centred delta at the identity pose fills the kz = 0 plane with 1 on SPARX's half-plane samples."""
    img = np.zeros((1, M, M))
    img[0, M // 2, M // 2] = 1.0
    acc = new_accumulator(M)
    n_p = acc.Np
    assert acc.data.shape == acc.weights.shape == (n_p, n_p, n_p // 2 + 1)
    insert(acc, img, np.zeros((1, 5)))
    ky = np.fft.fftfreq(n_p, 1.0 / n_p)[:, None]
    kx = np.arange(n_p // 2 + 1)[None, :]
    kept = (kx ** 2 + ky ** 2 < n_p ** 2 // 4) & ~((kx == 0) & (ky < 0))
    assert np.allclose(acc.data[0][kept], 1.0) and np.allclose(acc.weights[0][kept], 1.0)
    assert acc.weights[0][~kept].sum() == 0 and acc.weights[1:].sum() == 0
    # A shift (sx, sy) = (2, -3): the image is the centred one moved by (-2, +3); insertion moves it back.
    moved = np.roll(img, (3, -2), axis=(1, 2))
    spec, _ = slice_transforms(moved, np.array([[0, 0, 0, 2.0, -3.0]]))
    centred, _ = slice_transforms(img, np.zeros((1, 5)))
    assert np.allclose(spec, centred, atol=1e-12)


def _sparx_weight_loop(w):
    """nn4_ctfReconstructor::finish's neighbour-count correction, loop by loop as the C++ runs it (including its
    `cz + jj` and in-place flip), for each voxel with w > 0 of a half grid (z, y, x)."""
    n_p, lim = w.shape[0], w.shape[0] // 2
    a = [np.exp(0.2 * c) for c in range(10)]
    a[9] = 0.0
    box = [(i, j, k) for i in range(-3, 4) for j in range(-3, 4) for k in range(-3, 4)]
    alpha = (1 - 1 / 343) / sum(a[10 - abs(i) - abs(j) - abs(k)] for i, j, k in box if (i, j, k) != (0, 0, 0))
    out = np.ones_like(w)
    for z, y, cx in zip(*np.nonzero(w > 0)):
        cy, cz = (y if y < lim else y - n_p), (z if z < lim else z - n_p)
        total = 0.0
        for i in range(-3, 4):
            nx = cx + i
            if nx >= lim:
                continue
            for j in range(-3, 4):
                ny = cy + j
                if not -lim < ny < lim:
                    continue
                for k in range(-3, 4):
                    nz = cz + j
                    if not -lim < nz < lim:
                        continue
                    if nx < 0:
                        nx, ny, nz = -nx, -ny, -nz
                    if w[nz % n_p, ny % n_p, nx] == 0:
                        total += a[10 - abs(i) - abs(j) - abs(k)]
        out[z, y, cx] = 1 / (1 - alpha * total)
    return out


@pytest.mark.parametrize("n_p", [8, 12])
def test_neighbour_weights_follow_the_sparx_loop(n_p, rng):
    w = rng.uniform(0.1, 1, (n_p, n_p, n_p // 2 + 1)) * (rng.uniform(size=(n_p, n_p, n_p // 2 + 1)) < 0.6)
    want = _sparx_weight_loop(w)
    got = _neighbour_weights(w)
    filled = w > 0
    assert want[filled].max() > 1.5                      # the correction is really exercised
    assert np.abs(got[filled] - want[filled]).max() < 1e-12


# --------------------------------------------------------------------------------------------- recovery
def test_reconstruct_without_ctf(data):
    rec = reconstruct(data["images"], data["poses"])
    assert rec.shape == (M, M, M) and rec.dtype == np.float64
    axis = np.arange(M) - M // 2
    r2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    assert np.all(rec[r2 > (M // 2) ** 2] == 0) and np.all(rec[r2 <= (M // 2) ** 2] != 0)   # circumfnn's mask
    cc = _corr(rec, data["vol"])
    assert cc > 0.99, f"nn4 reconstruction from 1500 exact projections: correlation {cc:.4f} with the map"


def test_reconstruct_with_ctf(data):
    rec = reconstruct(data["images_ctf"], data["poses"], ctf=data["ctf"], apix_A=APIX_A)
    cc = _corr(rec, data["vol"])
    assert cc > 0.99, f"nn4_ctf reconstruction from 1500 CTF-modulated projections: correlation {cc:.4f}"
    # The CTF-free data and the CTF data give the same map.
    cc_pair = _corr(rec, reconstruct(data["images"], data["poses"]))
    assert cc_pair > 0.99, f"nn4_ctf vs nn4 maps: correlation {cc_pair:.4f}"


def test_shifted_images_reconstruct_the_same_map(data, rng):
    n = 1000
    poses = data["poses"][:n].copy()
    poses[:, 3:5] = rng.uniform(-3, 3, (n, 2))
    shifted = project(data["vol"], poses, oversampling_eps=EPS)
    plain = reconstruct(data["images"][:n], data["poses"][:n])
    rec = reconstruct(shifted, poses)
    cc = _corr(rec, plain)
    assert cc > 0.9999, f"shifted vs unshifted images: correlation {cc:.6f}"
    wrong = poses.copy()
    wrong[:, 3:5] *= -1
    cc_wrong = _corr(reconstruct(shifted, wrong), plain)
    assert cc_wrong < 0.8, f"the opposite shift sign should spoil the map; correlation {cc_wrong:.4f}"


def _blobs(m, centres, sigmas):
    axis = (np.arange(m) - m // 2).astype(np.float64)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    vol = np.zeros((m, m, m))
    for (cx, cy, cz), s in zip(centres, sigmas):
        vol += np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))
    return vol


def test_c4_symmetry_from_one_asymmetric_unit(rng):
    """Poses in phi 0..90, theta 0..90 (SPARX's c4 unit) with sym=c4 match 4x as many poses over the sphere."""
    ops = symmetry_rotations("c4")
    base, sigmas = rng.uniform(-9, 9, (5, 3)), rng.uniform(1.5, 3.0, 5)
    centres = np.concatenate([base @ op.T for op in ops])      # closed under the group: V(S x) = V(x)
    vol = _blobs(M, centres, np.tile(sigmas, len(ops)))
    n = 500
    unit = np.column_stack([rng.uniform(0, 90, n), np.rad2deg(np.arccos(rng.uniform(0, 1, n))),
                            rng.uniform(0, 360, n), np.zeros((n, 2))])
    sphere = _uniform_poses(rng, 4 * n)
    unit_images = project(vol, unit, oversampling_eps=EPS)
    c4 = reconstruct(unit_images, unit, sym="c4")
    full = reconstruct(project(vol, sphere, oversampling_eps=EPS), sphere)
    c1 = reconstruct(unit_images, unit, sym="c1")
    cc4, ccf, cc1 = _corr(c4, vol), _corr(full, vol), _corr(c1, vol)
    msg = f"correlations with the map: c4 from one unit {cc4:.4f}, c1 over the sphere {ccf:.4f}, c1 from the unit {cc1:.4f}"
    assert cc4 > 0.995 and abs(cc4 - ccf) < 0.003, msg
    assert cc1 < cc4 - 0.03, msg


# --------------------------------------------------------------------------------------------- additivity
def test_insert_is_linear_and_accumulators_add(data):
    images, poses, ctf = data["images_ctf"][:60], data["poses"][:60], data["ctf"][:60]
    other = data["images"][60:120]
    kw = dict(ctf=ctf, apix_A=APIX_A)

    # insert(A) then insert(B) at the same poses == insert(A + B): the data add, the weights count twice
    two = new_accumulator(M, sym="c2")
    insert(two, images, poses, **kw)
    insert(two, other, poses, **kw)
    one = new_accumulator(M, sym="c2")
    insert(one, images + other, poses, **kw)
    assert np.allclose(two.data, one.data, rtol=0, atol=1e-9 * np.abs(one.data).max())
    assert np.allclose(two.weights, 2 * one.weights, rtol=1e-12, atol=0)

    # add() of two accumulators == one accumulator given both sets (the MPI reduction)
    a, b, both = (new_accumulator(M, sym="c2") for _ in range(3))
    insert(a, images[:25], poses[:25], ctf=ctf[:25], apix_A=APIX_A)
    insert(b, images[25:], poses[25:], ctf=ctf[25:], apix_A=APIX_A)
    insert(both, images, poses, **kw)
    total = add(a, b)
    assert total.n_images == 60 and total.ctf is True
    assert np.allclose(total.data, both.data, rtol=0, atol=1e-12 * np.abs(both.data).max())
    assert np.allclose(total.weights, both.weights, rtol=1e-12, atol=0)
    assert np.allclose(finish(total), finish(both), rtol=0, atol=1e-10)

    # halves: the full map from the two half accumulators is the map of all images
    even, odd, full = reconstruct_halves(images, poses, sym="c2", chunk=7, **kw)
    assert np.allclose(full, reconstruct(images, poses, sym="c2", **kw), rtol=0, atol=1e-10)
    assert np.allclose(even, reconstruct(images[::2], poses[::2], ctf=ctf[::2], apix_A=APIX_A, sym="c2"), atol=1e-10)
    assert not np.allclose(even, odd)


def test_inputs_are_checked(data):
    acc = new_accumulator(M)
    insert(acc, data["images"][:2], data["poses"][:2])
    with pytest.raises(ValueError, match="mix"):
        insert(acc, data["images_ctf"][:2], data["poses"][:2], ctf=data["ctf"][:2], apix_A=APIX_A)
    with pytest.raises(ValueError, match="sym"):
        add(acc, new_accumulator(M, sym="c3"))
    with pytest.raises(ValueError, match="shape"):
        insert(acc, data["images"][:2, :16, :16], data["poses"][:2])
    with pytest.raises(ValueError, match="poses"):
        insert(acc, data["images"][:2], data["poses"][:3])
    with pytest.raises(ValueError, match="npad"):
        new_accumulator(33, npad=1)
    with pytest.raises(ValueError, match="half"):
        reconstruct_halves(data["images"][:4], data["poses"][:4], half=np.array([0, 1, 2, 0]))


# --------------------------------------------------------------------------------------------- RELION's data
def test_relion_clean_set_reconstructs_the_reference(shared_data):
    import mrcfile
    import starfile

    folder = shared_data / "relion_sim"
    star = starfile.read(folder / "clean" / "sim.star")
    optics, particles = star["optics"], star["particles"]
    apix = float(optics["rlnImagePixelSize"].iloc[0])
    poses = relion_to_spider(particles["rlnAngleRot"], particles["rlnAngleTilt"], particles["rlnAnglePsi"],
                             particles["rlnOriginXAngst"], particles["rlnOriginYAngst"], apix)
    ctf = ctf_module.from_relion(particles["rlnDefocusU"], particles["rlnDefocusV"], particles["rlnDefocusAngle"],
                                 float(optics["rlnVoltage"].iloc[0]), float(optics["rlnSphericalAberration"].iloc[0]),
                                 float(optics["rlnAmplitudeContrast"].iloc[0]))
    # sim.star lists the images in stack order 1..n
    order = [int(name.split("@")[0]) - 1 for name in particles["rlnImageName"]]
    assert order == list(range(len(order)))
    with mrcfile.open(folder / "clean" / "sim.mrcs", permissive=True) as f:
        images = np.asarray(f.data, dtype=np.float64)
    with mrcfile.open(folder / "ref.mrc", permissive=True) as f:
        ref = np.asarray(f.data, dtype=np.float64)
    rec = reconstruct(images, poses, ctf=ctf, apix_A=apix)
    cc = _corr(rec, ref)
    assert cc > 0.9, f"nn4_ctf map of relion_sim/clean (200 images, snr=1): correlation {cc:.4f} with ref.mrc"


@pytest.mark.parametrize("m,npad", [(16, 2), (15, 2), (12, 3), (10, 1)])
def test_inverse_centre_window_equals_the_window_of_the_full_inverse(m, npad):
    """finish's axis-by-axis inverse with windowing keeps exactly the M^3 box about the origin of irfftn."""
    n_p = m * npad
    rng = np.random.default_rng(m + npad)
    data = rng.standard_normal((n_p, n_p, n_p // 2 + 1)) + 1j * rng.standard_normal((n_p, n_p, n_p // 2 + 1))
    full = np.fft.irfftn(data, s=(n_p, n_p, n_p), axes=(0, 1, 2))
    i = (np.arange(m) - m // 2) % n_p
    expected = full[np.ix_(i, i, i)]
    got = _inverse_centre_window(data, n_p, m)
    assert got.shape == (m, m, m) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def _half_accumulators(rng, insertion, ctf):
    """Two half-set host accumulators of a phantom's projections (M = 32, 40 images each, optionally with CTF)."""
    vol = phantom(M)
    poses = _uniform_poses(rng, 80)
    images = project(vol, poses, oversampling_eps=EPS)
    params = None
    if ctf:
        params = ctf_module.CTFParams(defocus_u_A=rng.uniform(8000, 20000, 80), defocus_v_A=rng.uniform(8000, 20000, 80),
                                      astig_angle_deg=rng.uniform(0, 180, 80), voltage_kV=300.0, cs_mm=2.7,
                                      amp_contrast=0.1, bfactor_A2=0.0)
    accs = []
    for half in (slice(0, 40), slice(40, 80)):
        acc = new_accumulator(M, insertion=insertion)
        insert(acc, images[half], poses[half], ctf=None if params is None else params[np.arange(80)[half]],
               apix_A=APIX_A)
        accs.append(acc)
    return accs


def _on(backend, acc):
    """A copy of a host accumulator on the backend's device."""
    xp = backend.xp
    return type(acc)(xp.asarray(acc.data), xp.asarray(acc.weights), acc.M, acc.npad, acc.sym, acc.snr, acc.ctf,
                     acc.n_images, acc.insertion)


@pytest.mark.parametrize("insertion, ctf", [("trilinear", True), ("trilinear", False), ("nn4", False),
                                            ("nn4", True)])
def test_finish_on_a_backend_is_the_reference_bit_for_bit(backend, rng, insertion, ctf):
    """finish on a backend (kernels/finish.cu for steps 1-2, the sum of two accumulators read in the same pass) gives
    the numpy reference's map bit for bit: one accumulator, the sum of the half sets (plus=), SPARX's constant and
    per-shell terms. nn4 with CTF (nn4_ctf's neighbour weighting) goes through the host and must agree too."""
    a, b = _half_accumulators(rng, insertion, ctf)
    lam = np.linspace(0.05, 2.0, 60)
    da, db = _on(backend, a), _on(backend, b)
    for kw in ({}, {"regularisation": lam}):
        for plus in (None, b):
            want = finish(a if plus is None else add(a, b), **kw)
            got = finish(da, plus=None if plus is None else db, backend=backend, **kw)
            assert isinstance(got, np.ndarray)
            np.testing.assert_array_equal(got, want)
            assert np.abs(want).max() > 0
    np.testing.assert_array_equal(finish(a, plus=b), finish(add(a, b)))


def test_finish_of_a_sum_on_the_standin_launches_the_finish_kernel_once(standin_backend, rng):
    """On the GPU host path the full map's finish reads both half grids in one launch of kernels/finish.cu, and
    only the M^3 map comes back; the result is the host's bit for bit."""
    a, b = _half_accumulators(rng, "trilinear", True)
    xp = standin_backend.xp
    da, db = _on(standin_backend, a), _on(standin_backend, b)
    before = xp.counts.snapshot()
    got = finish(da, plus=db, backend=standin_backend)
    spent = xp.counts - before
    np.testing.assert_array_equal(got, finish(add(a, b)))
    assert spent.kernels.get("finish") == 1
    assert spent.d2h_bytes == got.nbytes
    assert xp.counts.mixing_errors == 0


def test_finish_refuses_a_plus_that_does_not_add(rng):
    a = new_accumulator(M, insertion="trilinear")
    with pytest.raises(ValueError, match="different insertion"):
        finish(a, plus=new_accumulator(M, insertion="nn4"))
