"""The adaptive mask (masking.adaptive_mask, --automask): the particle's envelope from its map, within the sphere."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gpu_ali3d import local_ali3d
from gpu_ali3d.io.formats import read_stack, read_volume, write_stack, write_volume
from gpu_ali3d.masking import DILATE_PX, EDGE_PX, MIN_PIECE, adaptive_mask
from gpu_ali3d.options import RefineOptions
from gpu_ali3d.resolution import sphere_mask
from gpu_ali3d.simulate import phantom, simulate

M = 48


def _ball(centre, radius, m=M):
    z, y, x = np.indices((m, m, m)) - np.asarray(centre, dtype=float)[:, None, None, None]
    return np.sqrt(x * x + y * y + z * z), (np.sqrt(x * x + y * y + z * z) <= radius).astype(float)


def _particle():
    """A ball of radius 6 off centre, a separate smaller domain (radius 2.5, 7 % of its volume) 22 pixels away and
    a one-voxel speck (0.1 %) 13 pixels from the ball's surface, all inside the sphere and of one density."""
    dist, blob = _ball((14, 24, 24), 6)
    _, domain = _ball((36, 24, 24), 2.5)
    speck = np.zeros_like(blob)
    speck[24, 24, 8] = 1.0
    return dist, blob, domain, speck


def test_the_mask_covers_the_particle_grown_by_its_margin_and_drops_a_separate_speck():
    dist, blob, domain, speck = _particle()
    vol = blob + domain + speck
    sphere = sphere_mask(M, 22)
    mask = adaptive_mask(vol, 8.0, sphere, threshold=0.2)      # 8 A/px: a 15 A low-pass is beyond Nyquist
    assert mask.shape == vol.shape and mask.min() >= 0 and mask.max() <= 1
    assert (mask[(blob + domain) > 0] == 1).all()              # the whole particle, both pieces, at full weight
    assert (mask[sphere == 0] == 0).all()                      # never beyond the sphere
    # DILATE_PX beyond the ball's surface it is still 1 (less a pixel: the voxel ball's surface is a staircase),
    # and from DILATE_PX + EDGE_PX on it is 0
    assert (mask[(dist <= 6 + DILATE_PX - 1) & (sphere > 0)] == 1).all()
    far = (dist >= 6 + DILATE_PX + EDGE_PX) & (_ball((36, 24, 24), 0)[0] >= 2.5 + DILATE_PX + EDGE_PX)
    assert (mask[far] == 0).all()
    assert 1 / blob.sum() < MIN_PIECE < domain.sum() / blob.sum()
    assert mask[24, 24, 8] == 0                                # the speck (< MIN_PIECE of the ball) is left out
    line = mask[14, 24, 24:]                                   # from the ball's centre outwards, along x
    assert (np.diff(line) <= 1e-12).all() and line[0] == 1 and line[-1] == 0


def test_a_lower_threshold_keeps_more_and_the_fraction_must_be_in_range():
    _, blob, domain, _ = _particle()
    vol = blob + domain + 0.2 * np.exp(-((np.indices(blob.shape) - 24.0) ** 2).sum(0) / 200.0)   # a faint halo
    sphere = sphere_mask(M, 22)
    low, high = (adaptive_mask(vol, 4.0, sphere, threshold=t) for t in (0.05, 0.5))
    assert (low >= high - 1e-12).all() and low.sum() > high.sum()
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="automask"):
            adaptive_mask(vol, 4.0, sphere, threshold=bad)
    with pytest.raises(ValueError, match="shape"):
        adaptive_mask(vol, 4.0, sphere[:-1], threshold=0.1)


def test_a_map_with_nothing_above_zero_gives_the_sphere():
    sphere = sphere_mask(M, 20)
    np.testing.assert_array_equal(adaptive_mask(-np.ones((M, M, M)), 2.0, sphere, threshold=0.1), sphere)


def test_the_binned_mask_of_a_finely_sampled_map_matches_the_full_grid_one():
    # at 1 A/px the work is done on a 4x binned grid (4 A <= 15 A / 3); a map that is smooth at 15 A gives nearly
    # the same mask as the same steps on the full grid
    m = 64
    dist, ball = _ball((32, 30, 34), 12, m)
    vol = np.exp(-0.5 * (dist / 10.0) ** 4)
    sphere = sphere_mask(m, 30)
    binned = adaptive_mask(vol, 1.0, sphere, threshold=0.3)
    full = adaptive_mask(vol, 1.0, sphere, threshold=0.3, binning=1)
    with pytest.raises(ValueError, match="divisor"):
        adaptive_mask(vol, 1.0, sphere, threshold=0.3, binning=3)
    a, b = binned > 0.5, full > 0.5
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95                  # the 4-pixel blocks' staircase apart
    grid = np.indices(vol.shape)
    centre = [(grid * w).sum(axis=(1, 2, 3)) / w.sum() for w in (binned, full)]
    np.testing.assert_allclose(centre[0], centre[1], atol=0.5)              # not moved by the binning
    assert abs(a.sum() / b.sum() - 1) < 0.1 and np.abs(binned - full).max() < 0.5


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("automask")
    stack, _ = simulate(phantom(32), 40, apix_A=4.0, snr=5.0, angle_error_deg=3.0, shift_error_px=1.0, ctf=True,
                        rng=np.random.default_rng(4))
    write_stack(stack, tmp / "sim.star")
    return tmp


def test_refine_masks_by_the_envelope_by_default_and_by_the_sphere_or_a_file_when_told(small_run, capsys):
    star = small_run / "sim.star"
    box, ou = 32, 14
    assert RefineOptions().automask > 0
    local_ali3d(str(star), small_run / "auto", ou=ou, maxit=1, CTF=True, progress=False)
    assert "mask automask" in capsys.readouterr().out
    auto, _ = read_volume(small_run / "auto" / "mask.mrc")
    sphere = sphere_mask(box, ou)
    assert (auto <= sphere + 1e-6).all() and auto.sum() < 0.9 * sphere.sum()       # narrower than the sphere
    final, _ = read_volume(small_run / "auto" / "map.mrc")
    again = adaptive_mask(final, 4.0, sphere, threshold=RefineOptions().automask)  # the final map's envelope
    assert (np.abs(again - auto) > 1e-3).mean() < 0.01                 # (map.mrc is float32: a voxel may flip)

    local_ali3d(str(star), small_run / "sphere", ou=ou, maxit=1, CTF=True, automask=0, progress=False)
    np.testing.assert_array_equal(read_volume(small_run / "sphere" / "mask.mrc")[0], sphere.astype(np.float32))

    given = sphere_mask(box, 10, soft_edge=2.0)
    write_volume(small_run / "given.mrc", given.astype(np.float32), 4.0)
    local_ali3d(str(star), small_run / "file", small_run / "given.mrc", ou=ou, maxit=1, CTF=True, progress=False)
    assert "mask given.mrc" in capsys.readouterr().out
    np.testing.assert_array_equal(read_volume(small_run / "file" / "mask.mrc")[0], given.astype(np.float32))


def test_continue_of_a_run_from_before_automask_keeps_the_sphere(small_run, capsys):
    from gpu_ali3d.cli import main
    from test_refine_resume import _refine_killed_after

    star = small_run / "sim.star"
    args = ["--ou", "14", "--maxit", "2", "--chunk", "0.5", "--CTF", "--automask", "0"]
    assert main(["refine", str(star), str(small_run / "whole"), *args]) == 0
    _refine_killed_after(star, small_run / "old", args, (1, 1))
    job_path = small_run / "old" / "job.json"
    job = json.loads(job_path.read_text())
    del job["options"]["automask"]                             # as a job.json written before the option existed
    job_path.write_text(json.dumps(job))
    capsys.readouterr()
    assert main(["refine", "--continue", str(small_run / "old")]) == 0
    assert "mask sphere" in capsys.readouterr().out
    np.testing.assert_array_equal(read_stack(small_run / "old" / "particles.star").poses,
                                  read_stack(small_run / "whole" / "particles.star").poses)
