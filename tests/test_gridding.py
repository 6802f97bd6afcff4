"""Kaiser-Bessel gridding (gpu_ali3d.gridding) against independent anchors: finufft's exact evaluation of the map's
DFT, the finufft projector of gpu_ali3d.projection, and SPARX's closed forms of the window."""
from __future__ import annotations

import mrcfile
import numpy as np
import pytest
from scipy.integrate import quad
from scipy.ndimage import gaussian_filter

from gpu_ali3d import gridding
from gpu_ali3d.ctf import from_relion
from gpu_ali3d.projection import project


# ----------------------------------------------------------------------------------------------- helpers
def smooth_map(m: int, rng: np.random.Generator) -> np.ndarray:
    """A particle-like test map: smoothed noise inside a sphere that fades out from radius M/2 - 6 to M/2 - 2."""
    c = np.arange(m) - m // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    return gaussian_filter(rng.normal(size=(m, m, m)), 1.5) * np.clip((m / 2 - 2 - r) / 4.0, 0.0, 1.0)


def exact_dft(vol: np.ndarray, u: np.ndarray, pad: int = 2) -> np.ndarray:
    """The map's DFT F(u / pad) at points u (P, 3) (x, y, z; padded-grid units) by finufft type 2, to 1e-12."""
    import finufft

    m = vol.shape[0]
    c = 2.0 * np.pi * u / (pad * m)
    # modes run from -M//2 on each array axis (z, y, x), matching the centre voxel M // 2
    return finufft.nufft3d2(np.ascontiguousarray(c[:, 2]), np.ascontiguousarray(c[:, 1]),
                            np.ascontiguousarray(c[:, 0]), vol.astype(np.complex128), eps=1e-12, isign=-1)


def points_in_sphere(radius: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points uniform in the ball |u| <= radius, (n, 3)."""
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1)[:, None]
    return d * (radius * rng.uniform(size=n) ** (1.0 / 3.0))[:, None]


def random_poses(n: int, rng: np.random.Generator, shift: float = 3.0) -> np.ndarray:
    theta = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    return np.column_stack([rng.uniform(0, 360, n), theta, rng.uniform(0, 360, n),
                            rng.uniform(-shift, shift, n), rng.uniform(-shift, shift, n)])


def random_ctf(n: int, rng: np.random.Generator):
    return from_relion(rng.uniform(5000, 15000, n), rng.uniform(5000, 15000, n), rng.uniform(0, 180, n),
                       300.0, 2.7, 0.1)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------------------------- the window
def test_kb_window_matches_sparx_forms():
    """kb_weights is SPARX's i0win; kb_deapodisation is its exact transform and, normalised, SPARX's sinhwin."""
    m, pad, k, alpha = 32, 2, 6, 1.75
    n = pad * m
    assert gridding.kb_beta() == pytest.approx(2 * np.pi * alpha * (m / 2) * (k / (2.0 * n)))
    assert gridding.kb_weights(0.0) == 1.0
    assert np.all(gridding.kb_weights(np.array([3.0, -3.0, 3.5, 10.0])) == 0.0)
    assert gridding.kb_weights(1.3) == pytest.approx(gridding.kb_weights(-1.3))

    deapod = gridding.kb_deapodisation(m)
    x = np.arange(m) - m // 2
    for i in (0, 3, m // 2 - 1, m - 1):
        integral = quad(lambda u: gridding.kb_weights(u) * np.cos(2 * np.pi * u * x[i] / n), -3, 3, limit=200)[0]
        assert deapod[i] == pytest.approx(integral, rel=1e-9)
    # SPARX KaiserBessel::sinhwin (x in pixels, alphar = alpha * M / 2, fac = beta), normalised to 1 at x = 0
    fac, alphar = gridding.kb_beta(), alpha * m / 2
    rt = np.sqrt(1.0 - (x / alphar) ** 2)
    sinhwin = np.where(x == 0, 1.0, np.sinh(fac * rt) / np.where(x == 0, 1.0, fac * rt) / (np.sinh(fac) / fac))
    np.testing.assert_allclose(deapod / deapod[m // 2], sinhwin, rtol=1e-12)


@pytest.mark.parametrize("m", [32, 33])
def test_sample_reference_matches_finufft(m, rng):
    """KB K = 6 (SPARX) samples of the prepared map vs the exact DFT, over the Nyquist ball |u| <= N/2."""
    vol = smooth_map(m, rng)
    u = points_in_sphere(m, 6000, rng)                      # padded units: |u| <= N/2 = M, all of Nyquist
    exact = exact_dft(vol, u)
    err_kb = rel_err(gridding.sample_reference(gridding.prepare_reference(vol), u), exact)
    err_tri = rel_err(gridding.sample_reference(gridding.prepare_reference(vol, interpolation="trilinear"), u), exact)
    # A wider, better-shaped window shows that the implementation itself is exact (only the window limits it).
    err_k12 = rel_err(gridding.sample_reference(gridding.prepare_reference(vol, kb_width=12, kb_alpha=2.9), u[:500]),
                      exact[:500])
    assert err_kb < 1e-3, f"M={m}: KB K=6 relative error {err_kb:.3g} (expected < 1e-3)"
    assert err_tri > 10 * err_kb, f"M={m}: trilinear {err_tri:.3g} should be far worse than KB {err_kb:.3g}"
    assert err_k12 < 1e-9, f"M={m}: KB K=12 relative error {err_k12:.3g}"
    print(f"M={m}: relative error KB K=6 {err_kb:.3g}, trilinear {err_tri:.3g}, KB K=12 {err_k12:.3g}")


def test_sample_reference_relion_map(shared_data, rng):
    """The same on the RELION simulation's 64^3 ribosome map (content up to the box edge)."""
    vol = mrcfile.read(shared_data / "relion_sim" / "ref.mrc").astype(np.float64)
    u = points_in_sphere(vol.shape[0], 6000, rng)
    exact = exact_dft(vol, u)
    err_kb = rel_err(gridding.sample_reference(gridding.prepare_reference(vol), u), exact)
    err_tri = rel_err(gridding.sample_reference(gridding.prepare_reference(vol, interpolation="trilinear"), u), exact)
    assert err_kb < 1e-3, f"ref.mrc: KB K=6 relative error {err_kb:.3g} (expected < 1e-3)"
    assert err_tri > 10 * err_kb, f"ref.mrc: trilinear {err_tri:.3g} should be far worse than KB {err_kb:.3g}"
    print(f"ref.mrc: relative error KB K=6 {err_kb:.3g}, trilinear {err_tri:.3g}")


def test_sample_reference_symmetry_and_limits(rng):
    m = 16
    ref = gridding.prepare_reference(smooth_map(m, rng))
    u = points_in_sphere(m, 300, rng)
    a = gridding.sample_reference(ref, u)
    np.testing.assert_allclose(gridding.sample_reference(ref, -u), np.conj(a), rtol=0, atol=1e-12 * np.abs(a).max())
    assert gridding.sample_reference(ref, u.reshape(10, 30, 3)).shape == (10, 30)
    outside = np.array([[m + 0.1, 0.0, 0.0], [m, m, 0.0], [0.0, -m - 1e-6, 0.0]])   # |u| > N/2 (beyond rounding)
    assert np.all(gridding.sample_reference(ref, outside) == 0)
    # Grid points: the halo layout holds F_pad periodically and with Friedel mates, as documented.
    h, n, hc = ref.halo, ref.N, ref.half_cube
    assert hc.shape == (n, n, n // 2 + 1) and ref.data.shape == (n + 2 * h + 1, n + 2 * h + 1, n // 2 + 1 + 2 * h)
    for uz, uy, ux in [(3, -n // 2 - 2, -2), (n // 2 + 3, 5, n // 2 + 2), (-1, 0, -3), (0, 0, n // 2)]:
        wz, wy, wx = ((v + n // 2) % n - n // 2 for v in (uz, uy, ux))
        want = hc[wz + n // 2, wy + n // 2, wx] if wx >= 0 else np.conj(
            hc[(-wz + n // 2) % n, (-wy + n // 2) % n, -wx])
        assert ref.data[n // 2 + h + uz, n // 2 + h + uy, h + ux] == want


def test_prepare_reference_rejects_bad_input():
    with pytest.raises(ValueError, match="cube"):
        gridding.prepare_reference(np.zeros((8, 8, 9)))
    with pytest.raises(TypeError):
        gridding.prepare_reference(np.zeros((8, 8, 8), complex))
    with pytest.raises(ValueError, match="kb_alpha"):
        gridding.prepare_reference(np.zeros((8, 8, 8)), kb_alpha=0.9)
    with pytest.raises(ValueError, match="even"):
        gridding.prepare_reference(np.zeros((9, 9, 9)), pad=3)
    with pytest.raises(ValueError, match="interpolation"):
        gridding.prepare_reference(np.zeros((8, 8, 8)), interpolation="cubic")


# ----------------------------------------------------------------------------------------------- projections
@pytest.mark.parametrize("m", [32, 33])
def test_project_reference_equals_finufft_projector(m, rng):
    """Apples to apples: the finufft projector on the zero-padded map gives the exact N-grid projection; limited
    to the Nyquist disc (SPARX's rim) and cropped as SPARX depads, it must equal ours to the KB error."""
    vol = smooth_map(m, rng)
    n, s = 2 * m, m - m // 2
    poses, ctf = random_poses(5, rng), random_ctf(5, rng)
    ref = gridding.prepare_reference(vol)
    padded = np.zeros((n, n, n))
    padded[s:s + m, s:s + m, s:s + m] = vol
    kx, ky = gridding.section_grid(n)
    disc = kx ** 2 + ky ** 2 <= (n / 2) ** 2
    for c in (None, ctf):
        ours = gridding.project_reference(ref, poses, ctf=c, apix_A=3.0)
        exact = np.fft.irfft2(np.fft.rfft2(project(padded, poses, ctf=c, apix_A=3.0)) * disc, s=(n, n))
        exact = exact[:, s:s + m, s:s + m]
        err = rel_err(ours, exact)
        assert ours.shape == (5, m, m) and ours.dtype == np.float64
        assert err < 2e-3, f"M={m} ctf={c is not None}: relative error {err:.3g} vs the padded finufft projector"
        print(f"M={m} ctf={c is not None}: projection relative error {err:.3g}")


@pytest.mark.parametrize("m", [32, 33])
def test_project_reference_correlates_with_box_projector(m, rng):
    """Directly against project() on the M grid (which keeps the square's corners beyond Nyquist): corr > 0.999."""
    vol = smooth_map(m, rng)
    poses = random_poses(5, rng)
    ours = gridding.project_reference(gridding.prepare_reference(vol), poses)
    theirs = project(vol, poses)
    cc = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, theirs)]
    assert min(cc) > 0.999, f"M={m}: correlations {np.round(cc, 5)}"
    print(f"M={m}: min correlation with the M-grid projector {min(cc):.6f}")


def test_project_reference_relion_map_with_ctf(shared_data, rng):
    import starfile

    vol = mrcfile.read(shared_data / "relion_sim" / "ref.mrc").astype(np.float64)
    particles = starfile.read(shared_data / "relion_sim" / "clean" / "truth.star")["particles"].iloc[:4]
    ctf = from_relion(particles.rlnDefocusU, particles.rlnDefocusV, particles.rlnDefocusAngle, 300.0, 2.7, 0.1)
    poses = random_poses(4, rng)
    ours = gridding.project_reference(gridding.prepare_reference(vol), poses, ctf=ctf, apix_A=4.0)
    theirs = project(vol, poses, ctf=ctf, apix_A=4.0)
    cc = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, theirs)]
    assert min(cc) > 0.999, f"ref.mrc with CTF: correlations {np.round(cc, 5)}"
    print(f"ref.mrc with CTF: min correlation with the M-grid projector {min(cc):.6f}")


def test_central_section_layout_and_shift(rng):
    m = 16
    n = 2 * m
    ref = gridding.prepare_reference(smooth_map(m, rng))
    pose = np.array([30.0, 50.0, 70.0, 0.0, 0.0])
    shifted = pose + [0, 0, 0, 1.5, -2.25]
    a, b = gridding.central_section(ref, np.stack([pose, shifted]))
    kx, ky = gridding.section_grid(n)
    assert a.shape == (n, n // 2 + 1)
    np.testing.assert_allclose(b, a * np.exp(2j * np.pi * (kx * 1.5 - ky * 2.25) / n), atol=1e-12 * np.abs(a).max())
    limited = gridding.central_section(ref, pose, kmax=5.0)[0]
    assert np.all(limited[kx ** 2 + ky ** 2 > 25] == 0)
    np.testing.assert_array_equal(limited[kx ** 2 + ky ** 2 <= 25], a[kx ** 2 + ky ** 2 <= 25])
    # Identity pose: the section is the map's u_z = 0 plane, F(kx / 2, ky / 2, 0) (checked against finufft).
    vol = smooth_map(m, rng)
    flat = gridding.central_section(gridding.prepare_reference(vol), np.zeros(5))[0]
    disc = kx ** 2 + ky ** 2 <= (n / 2) ** 2
    u = np.stack([kx[disc], ky[disc], np.zeros(disc.sum())], axis=-1)
    assert rel_err(flat[disc], exact_dft(vol, u)) < 5e-3           # the K = 6 error of a small 16^3 map
    assert np.all(flat[~disc] == 0)
