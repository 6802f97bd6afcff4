"""Pieces of the driver: centring of the data (--center -1), pose normalisation, chunks and half sets."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_ali3d.geometry import angular_distance, rotation_matrix
from gpu_ali3d.io.formats import read_stack
from gpu_ali3d.alignment import normalise_poses
from gpu_ali3d.refine import _chunks, _half_sets, centre_data


def test_centre_data_removes_a_global_3d_offset_exactly(rng, shared_data):
    poses = read_stack(shared_data / "relion_sim" / "clean" / "truth.star").poses     # true shifts are zero
    t = np.array([1.5, -0.75, 2.0])                                                 # pixels, map frame
    offset = poses.copy()
    offset[:, 3:5] += rotation_matrix(poses[:, 0], poses[:, 1], poses[:, 2])[:, :2, :] @ t
    np.testing.assert_allclose(centre_data(offset)[:, 3:5], 0, atol=1e-12)
    np.testing.assert_array_equal(centre_data(offset)[:, :3], offset[:, :3])


def test_centre_data_does_not_drift(shared_data):
    # start.star: random 1.5-pixel errors with no common 3-D offset; centring repeatedly must settle, not walk
    poses = read_stack(shared_data / "relion_sim" / "clean" / "start.star").poses
    once = centre_data(poses)
    again = once
    for _ in range(10):
        again = centre_data(again)
    np.testing.assert_allclose(again, once, atol=1e-12)
    assert np.abs(once[:, 3:5] - poses[:, 3:5]).max() < 0.5     # only the small common part was removed


def test_normalise_poses_keeps_rotations(rng):
    p = np.column_stack([rng.uniform(-720, 720, (50, 3)), rng.normal(0, 2, (50, 2))])
    q = normalise_poses(p)
    assert np.all((q[:, 0] >= 0) & (q[:, 0] < 360) & (q[:, 1] >= 0) & (q[:, 1] <= 180) & (q[:, 2] >= 0) & (q[:, 2] < 360))
    assert angular_distance(p, q).max() < 1e-9
    np.testing.assert_array_equal(q[:, 3:], p[:, 3:])


@pytest.mark.parametrize("n, chunk, sizes", [(10, 1.0, [10]), (10, 0.5, [5, 5]), (10, 0.3, [4, 3, 3]), (3, 0.1, [1, 1, 1])])
def test_chunks_cover_every_particle_once(n, chunk, sizes):
    blocks = _chunks(n, chunk)
    assert [len(b) for b in blocks] == sizes
    np.testing.assert_array_equal(np.concatenate(blocks), np.arange(n))


def test_half_sets_follow_random_subset(shared_data):
    stack = read_stack(shared_data / "relion_sim" / "clean" / "sim.star")
    half = _half_sets(stack)
    np.testing.assert_array_equal(half, stack.meta["rlnRandomSubset"].astype(int) - 1)
    stack.meta.pop("rlnRandomSubset")
    # without one: a random split into n // 2 and n - n // 2, fixed by --seed, different for another seed
    drawn = _half_sets(stack, seed=3)
    assert drawn.sum() == len(stack) - len(stack) // 2 and set(np.unique(drawn)) == {0, 1}
    np.testing.assert_array_equal(_half_sets(stack, seed=3), drawn)
    assert not np.array_equal(_half_sets(stack, seed=4), drawn)
    assert not np.array_equal(drawn, np.arange(len(stack)) % 2)


def test_alignment_batch_fits_host_and_device_memory():
    from gpu_ali3d.alignment import _device_bytes_per_image, _prepared_bytes_per_image, alignment_batch

    host = alignment_batch(10**6, 64)
    assert host == (1 << 30) // _prepared_bytes_per_image(64)
    assert alignment_batch(100, 64) == 100 and alignment_batch(10**6, 64, 5000) == 5000
    # a GPU with little free memory: half of it for the batch on the device
    free = 64 << 20
    small = alignment_batch(10**6, 64, device_free=free, samples=600)
    assert small == (free // 2) // _device_bytes_per_image(64, 600) < host
    assert alignment_batch(10**6, 64, device_free=80 << 30) == host          # a large GPU: the host limit rules
    assert alignment_batch(10**6, 64, device_free=0) == 1
