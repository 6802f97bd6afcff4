"""Synthetic particle data with known poses: a built-in phantom, or any map, projected with CTF and noise.

The recipe follows the RELION-simulated sets in ../shared/data/relion_sim (``relion_project --ctf --add_noise
--white_noise``, then division by the noise sigma), so that a simulated stack looks like a normalised RELION stack:

* true orientations uniform on SO(3); true shifts zero;
* projections by the reference projector :func:`gpu_ali3d.projection.project` (exact central sections), times
  each particle's CTF;
* white Gaussian noise with ``signal variance / noise variance = snr``, the signal variance being the variance of
  all the noise-free images' pixels inside a disc of radius 0.4 * box about the image centre (pooled over the stack);
* images divided by the noise sigma (unit noise variance, as ``relion_preprocess --norm`` would give);
* starting poses perturbed by exactly ``angle_error_deg`` (a rotation about a random axis) and exactly
  ``shift_error_px`` (in a random direction), as in the ``start.star`` files.

Poses are in the convention of :mod:`gpu_ali3d.geometry` (SPIDER ZYZ degrees, SPARX shift sign in pixels).
"""
from __future__ import annotations

import numpy as np

from .ctf import CTFParams
from .geometry import euler_from_matrix
from .io.stack import ArrayImages, ParticleStack
from .projection import project

#: Fraction of the box giving the radius of the disc inside which the signal variance is measured (RELION sets).
SIGNAL_RADIUS_FRACTION = 0.4

#: Seed of the phantom's layout when no generator is given: the phantom depends on the box size only.
_PHANTOM_SEED = 20261125


def phantom(box: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A built-in asymmetric 3-D phantom: twelve Gaussian blobs and ellipsoids of different sizes and weights.

    box : side in voxels (>= 8). rng : a Generator to draw a different layout; None gives the fixed layout, so
    the phantom is deterministic for a given box (and looks the same at every box size: positions and widths
    scale with the box).
    Returns float32 (box, box, box), numpy order (z, y, x), centre voxel at box // 2, zero outside a sphere of
    radius 0.44 * box (all but ~1e-6 of the power within 0.35 * box), non-negative, scaled to unit variance over
    the box. The blobs are placed at random and differ in size, elongation and weight, so the phantom has no
    rotational symmetry (poses are identifiable) and is chiral.
    """
    if not isinstance(box, (int, np.integer)) or box < 8:
        raise ValueError(f"phantom box must be an integer >= 8 voxels; got {box!r}")
    box = int(box)
    if rng is None:
        rng = np.random.default_rng(_PHANTOM_SEED)
    axis = (np.arange(box) - box // 2) / box                               # voxel coordinates, box units
    x, y, z = axis[None, None, :], axis[None, :, None], axis[:, None, None]
    vol = np.zeros((box, box, box))
    # (number, radius range of the centres, sigma range, elongation range, weight range), all in box units.
    groups = [(2, (0.02, 0.08), (0.06, 0.075), (1.0, 1.5), (0.5, 0.7)),    # a large asymmetric core
              (4, (0.13, 0.20), (0.025, 0.035), (1.5, 2.5), (0.8, 1.2)),   # elongated domains
              (6, (0.16, 0.26), (0.015, 0.025), (1.0, 1.5), (1.0, 1.5))]   # small dense features
    for count, (r_lo, r_hi), (s_lo, s_hi), (e_lo, e_hi), (w_lo, w_hi) in groups:
        for _ in range(count):
            direction = rng.normal(size=3)
            position = direction / np.linalg.norm(direction) * rng.uniform(r_lo, r_hi)
            sigma = rng.uniform(s_lo, s_hi)
            sigmas = sigma * np.array([rng.uniform(e_lo, e_hi), 1.0, 1.0 / np.sqrt(rng.uniform(e_lo, e_hi))])
            orient = _random_rotation(rng)
            # (r - p).T Q (r - p) with Q = O.T diag(1 / sigmas^2) O: an ellipsoidal Gaussian with axes O's rows.
            quad = orient.T @ np.diag(1.0 / sigmas ** 2) @ orient
            d = (x - position[0], y - position[1], z - position[2])
            expo = sum(quad[i, j] * d[i] * d[j] for i in range(3) for j in range(3))
            vol += rng.uniform(w_lo, w_hi) * np.exp(-0.5 * expo)
    # A soft spherical edge (1 inside 0.36 * box, cosine to 0 at 0.44 * box) keeps the support compact.
    radius = np.sqrt(x * x + y * y + z * z)
    vol *= 0.5 + 0.5 * np.cos(np.pi * np.clip((radius - 0.36) / 0.08, 0.0, 1.0))
    vol /= vol.std()
    return vol.astype(np.float32)


def even_box(volume: np.ndarray) -> tuple[np.ndarray, int]:
    """An odd cube (M, M, M) padded to the even box M + 1, as particles for RELION and cryoSPARC need; even: as is.

    RELION extracts even boxes only and mishandles odd ones (RELION 3.1's relion_project of a 65^3 map is ours
    shifted by a pixel in x and y; tests/test_real_clients.py), so ``gpu-ali3d simulate`` of an odd map makes
    (M + 1)-pixel particles instead of refusing it. One plane is added before each axis (numpy order), so the map's
    centre voxel M // 2 becomes the new box's centre (M + 1) // 2: the projections are the odd map's with one more
    row and column, unshifted, for us and for RELION alike. The plane holds the mean of the map's outermost voxels
    (its solvent level), so no edge appears. Padding loses nothing, where cropping to M - 1 would drop a plane.

    Returns (float32 volume, the box before padding).
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"volume must be a cube (M, M, M) in numpy order (z, y, x); got shape {vol.shape}")
    box = vol.shape[0]
    if box % 2 == 0:
        return vol, box
    faces = np.concatenate([vol[[0, -1]].ravel(), vol[:, [0, -1]].ravel(), vol[:, :, [0, -1]].ravel()])
    return np.pad(vol, [(1, 0)] * 3, constant_values=float(faces.mean())), box


def simulate(volume: np.ndarray, n: int, *, apix_A: float, snr: float, angle_error_deg: float,
             shift_error_px: float, ctf: bool, rng: np.random.Generator,
             defocus_range_A: tuple[float, float] = (10000, 30000), astigmatism_A: float = 300,
             voltage_kV: float = 300, cs_mm: float = 2.7, amp_contrast: float = 0.1
             ) -> tuple[ParticleStack, np.ndarray]:
    """Simulate n particle images of a volume with known poses (module docstring for the recipe).

    Parameters
    ----------
    volume : real (M, M, M) map, numpy order (z, y, x), centre voxel at M // 2 (e.g. :func:`phantom`).
    n : number of particles (>= 1).
    apix_A : pixel size in Angstrom (for the CTF and the stack).
    snr : signal variance inside the 0.4 * M disc / noise variance, > 0. ``np.inf`` adds no noise and divides the
        images by the signal sigma instead (signal variance 1 inside the disc); a finite-SNR stack drawn with the
        same seed is then exactly ``sqrt(snr)`` times those images plus unit-variance white noise.
    angle_error_deg : each starting orientation is the true one rotated by exactly this angle about a random axis
        (uniform on the sphere; the perturbation is applied in the map's frame, R_start = R_true @ A).
    shift_error_px : each starting shift is the true one (zero) plus exactly this many pixels in a random direction.
    ctf : True to multiply the projections by a CTF (and return it in the stack); False for none (stack.ctf None).
    rng : the random Generator; the stream consumed does not depend on ``snr`` or ``ctf``, so one seed gives the
        same poses, CTFs and unit noise at every SNR.
    defocus_range_A : the mean defocus (U + V) / 2 of each particle is uniform in this range (Angstrom).
    astigmatism_A : U - V is uniform in [0, astigmatism_A]; the astigmatism angle uniform in [0, 180) degrees.
    voltage_kV, cs_mm, amp_contrast : optics shared by all particles (amplitude contrast as a fraction).

    Returns
    -------
    (stack, true_poses). stack : ParticleStack with float32 (n, M, M) images in memory (ArrayImages,
    image_refs None), the perturbed starting poses, apix_A, the CTFs (or None) and meta ``rlnRandomSubset``
    (1, 2, 1, 2, ...: alternating half-sets, int). true_poses : float64 (n, 5), phi, theta, psi, sx = sy = 0.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"volume must be a cube (M, M, M) in numpy order (z, y, x); got shape {vol.shape}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive number of particles; got {n!r}")
    if not (np.isfinite(apix_A) and apix_A > 0):
        raise ValueError(f"apix_A must be a positive pixel size in Angstrom; got {apix_A}")
    if not (snr > 0):
        raise ValueError(f"snr must be positive (np.inf for no noise); got {snr}")
    if not (np.isfinite(angle_error_deg) and 0 <= angle_error_deg <= 180):
        raise ValueError(f"angle_error_deg must be in [0, 180] degrees; got {angle_error_deg}")
    if not (np.isfinite(shift_error_px) and shift_error_px >= 0):
        raise ValueError(f"shift_error_px must be >= 0 pixels; got {shift_error_px}")
    lo, hi = (float(v) for v in defocus_range_A)
    if not (0 < lo <= hi) or not (0 <= astigmatism_A <= 2 * lo):
        raise ValueError(f"defocus_range_A={defocus_range_A} must be 0 < low <= high (Angstrom, underfocus) and "
                         f"astigmatism_A={astigmatism_A} between 0 and twice the lowest defocus")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)); got {type(rng).__name__}")
    n = int(n)
    box = vol.shape[0]

    # True orientations, uniform on SO(3), and zero shifts.
    true_rot = _random_rotation(rng, n)
    true_poses = np.zeros((n, 5))
    true_poses[:, 0], true_poses[:, 1], true_poses[:, 2] = euler_from_matrix(true_rot)

    # Starting poses: rotate by exactly angle_error_deg about a random axis; shift by exactly shift_error_px.
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    start_rot = true_rot @ _axis_angle_matrix(axes, np.deg2rad(angle_error_deg))
    shift_dir = rng.uniform(0.0, 2.0 * np.pi, size=n)
    start_poses = np.empty((n, 5))
    start_poses[:, 0], start_poses[:, 1], start_poses[:, 2] = euler_from_matrix(start_rot)
    start_poses[:, 3] = true_poses[:, 3] + shift_error_px * np.cos(shift_dir)
    start_poses[:, 4] = true_poses[:, 4] + shift_error_px * np.sin(shift_dir)

    # CTFs (drawn whether used or not, so the stream does not depend on `ctf`).
    mean_df = rng.uniform(lo, hi, size=n)
    astig = rng.uniform(0.0, astigmatism_A, size=n)
    astig_angle = rng.uniform(0.0, 180.0, size=n)
    ctf_params = CTFParams(mean_df + 0.5 * astig, mean_df - 0.5 * astig, astig_angle, voltage_kV, cs_mm,
                           amp_contrast, 0.0) if ctf else None

    signal = project(vol.astype(np.float64), true_poses, ctf=ctf_params, apix_A=apix_A)     # float64 (n, M, M)
    axis = np.arange(box) - box // 2
    disc = np.hypot(axis[:, None], axis[None, :]) <= SIGNAL_RADIUS_FRACTION * box
    signal_var = float(np.var(signal[:, disc]))
    if not signal_var > 0:
        raise ValueError("the volume projects to constant images (zero signal variance); give a map with content")
    noise = rng.standard_normal(size=signal.shape)
    if np.isinf(snr):
        images = signal / np.sqrt(signal_var)
    else:
        noise_sigma = np.sqrt(signal_var / snr)
        images = signal / noise_sigma + noise

    stack = ParticleStack(images=ArrayImages(images.astype(np.float32), name="<simulated>"), poses=start_poses,
                          apix_A=float(apix_A), ctf=ctf_params, image_refs=None,
                          meta={"rlnRandomSubset": (np.arange(n) % 2 + 1).astype(np.int64)})
    return stack, true_poses


def _random_rotation(rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    """Rotation matrices uniform on SO(3) (Haar measure): normalised Gaussian quaternions. (3, 3) or (n, 3, 3)."""
    q = rng.normal(size=(1 if n is None else n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    r = np.empty((len(q), 3, 3))
    r[:, 0, 0] = 1 - 2 * (y * y + z * z)
    r[:, 0, 1] = 2 * (x * y - z * w)
    r[:, 0, 2] = 2 * (x * z + y * w)
    r[:, 1, 0] = 2 * (x * y + z * w)
    r[:, 1, 1] = 1 - 2 * (x * x + z * z)
    r[:, 1, 2] = 2 * (y * z - x * w)
    r[:, 2, 0] = 2 * (x * z - y * w)
    r[:, 2, 1] = 2 * (y * z + x * w)
    r[:, 2, 2] = 1 - 2 * (x * x + y * y)
    return r[0] if n is None else r


def _axis_angle_matrix(axes: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotations by angle_rad about unit axes (n, 3) (Rodrigues): float64 (n, 3, 3)."""
    k = np.zeros((len(axes), 3, 3))
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axes[:, 2], axes[:, 1], -axes[:, 0]
    k[:, 1, 0], k[:, 2, 0], k[:, 2, 1] = axes[:, 2], -axes[:, 1], axes[:, 0]
    return np.eye(3) + np.sin(angle_rad) * k + (1.0 - np.cos(angle_rad)) * (k @ k)
