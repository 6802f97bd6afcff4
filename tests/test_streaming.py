"""Stacks larger than memory (issue 12): beyond --image-budget a rank's images are read from their files batch by
batch (io.stack.StreamedImages) for the reconstruction and the alignment, with the same result as in memory."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_ali3d import noise
from gpu_ali3d.io.formats import read_stack, read_volume, write_stack
from gpu_ali3d.io.stack import ArrayImages, StreamedImages, materialise
from gpu_ali3d.options import RefineOptions
from gpu_ali3d.refine import local_ali3d
from gpu_ali3d.simulate import phantom, simulate
from gpu_ali3d.standin import profile_local_ali3d


def _stack(n, box=32):
    stack, _ = simulate(phantom(box), n, apix_A=4.0, snr=5.0, angle_error_deg=4.0, shift_error_px=1.5, ctf=True,
                        rng=np.random.default_rng(21))
    return stack


def _outputs(outdir):
    """What a run leaves that must not depend on how its images were held: poses and maps."""
    return ((outdir / "params_000.txt").read_bytes(), (outdir / "params_001.txt").read_bytes(),
            read_stack(outdir / "particles.star").poses.tobytes(), read_volume(outdir / "map.mrc")[0])


def test_streamed_images_read_only_what_is_used():
    images = np.random.default_rng(0).standard_normal((10, 8, 8)).astype(np.float32)
    reads = []

    class Counting(ArrayImages):
        def read(self, indices):
            reads.append(np.asarray(indices).tolist())
            return super().read(indices)

    streamed = StreamedImages(Counting(images), np.arange(2, 10))
    assert streamed.shape == (8, 8, 8) and streamed.ndim == 3 and len(streamed) == 8 and streamed.nbytes == 2048
    part = streamed[1:5][np.array([3, 0])]
    assert reads == [] and isinstance(part, StreamedImages)
    np.testing.assert_array_equal(materialise(part), images[[6, 3]])
    assert reads == [[6, 3]]
    assert materialise(images) is images
    with pytest.raises(TypeError, match="slice or a 1-d integer array"):
        streamed[3]


@pytest.mark.parametrize("suffix", [".star", ".hdf"])
def test_refine_under_a_small_image_budget_gives_the_in_memory_result(tmp_path, suffix, capsys, monkeypatch):
    """A run whose images exceed --image-budget (1 MiB, under 400 x 32^2 x 4 B = 1.6 MiB) refines from its files
    batch by batch and gives the in-memory run's poses and maps, byte for byte; on the CPU backend with MRC (STAR)
    and HDF stacks, in two chunks and batches of 50."""
    stack = _stack(n=400)                                      # 400 x 32^2 x 4 B = 1.6 MiB
    path = tmp_path / f"sim{suffix}"
    write_stack(stack, path)
    opts = dict(maxit=2, CTF=True, chunk=0.5, batch=50, device="cpu")
    local_ali3d(path, tmp_path / "memory", options=RefineOptions(**opts), progress=False)
    assert "batch by batch" not in capsys.readouterr().out
    reads = []
    real = StreamedImages.__array__

    def counted(self, *args, **kwargs):
        reads.append(len(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StreamedImages, "__array__", counted)
    local_ali3d(path, tmp_path / "streamed", options=RefineOptions(image_budget=1, **opts), progress=False)
    # first the noise estimate of the whitened objective (the default here: box 32 leaves enough background),
    # noise.BLOCK images at a time through the 400; then every read is one insertion call's images (here a half
    # set: 200; reconstruct.insert_chunk, the same as in memory, so that the fixed-point sums and their order, and
    # so the maps, are the same) or one alignment batch
    estimate = [min(noise.BLOCK, 400 - start) for start in range(0, 400, noise.BLOCK)]
    assert reads[:len(estimate)] == estimate, reads
    assert sorted(set(reads[len(estimate):])) == [50, 200], reads
    assert "more than the image budget of 1 MiB; they are read from the files batch by batch" in capsys.readouterr().out
    memory, streamed = _outputs(tmp_path / "memory"), _outputs(tmp_path / "streamed")
    assert memory[:3] == streamed[:3]
    np.testing.assert_array_equal(memory[3], streamed[3])


def test_gpu_path_streams_too(tmp_path):
    """The GPU host path on the stand-in under a small budget: the same poses as in memory, and the images cross
    to the device batch by batch (more host->device bytes than the resident run's one upload)."""
    stack = _stack(n=400)
    write_stack(stack, tmp_path / "sim.star")
    memory = profile_local_ali3d(str(tmp_path / "sim.star"), tmp_path / "memory", maxit=1, CTF=True)
    streamed = profile_local_ali3d(str(tmp_path / "sim.star"), tmp_path / "streamed", maxit=1, CTF=True,
                                   image_budget=1)
    assert (tmp_path / "memory" / "params_000.txt").read_bytes() == (tmp_path / "streamed" / "params_000.txt").read_bytes()
    def total(profile, field):
        return getattr(profile.setup, field) + sum(getattr(c, field) for c in profile.iterations)

    assert total(streamed, "h2d_bytes") > total(memory, "h2d_bytes")
    assert total(streamed, "mixing_errors") == 0


def test_image_budget_is_checked():
    with pytest.raises(ValueError, match="--image-budget -1"):
        RefineOptions(image_budget=-1)


def test_memory_estimate_leaves_out_what_a_streamed_run_does_not_hold():
    """refine's printed estimate: a streamed run holds neither the images nor the images prepared once for the
    alignment (20,000 at box 128: 1.25 GiB of images and about 2.4 GiB prepared)."""
    from gpu_ali3d.alignment import full_band_bytes
    from gpu_ali3d.refine import memory_estimate_bytes

    opts = RefineOptions()
    held = memory_estimate_bytes(20000, 128, opts)
    streamed = memory_estimate_bytes(20000, 128, opts, streamed=True)
    assert held - streamed == 20000 * 128 * 128 * 4 + full_band_bytes(20000, 128)
