"""What a GPU would pay for a refinement, as budgets: ``local_ali3d(..., device="gpu")`` end to end on the strict CuPy
stand-in (gpu_ali3d.standin), serially and under ``mpiexec -n 2``, with the counts printed (they show in CI's log).

The run: simulated phantom particles with CTF, box 32, two alignment iterations and the final reconstruction
(``maxit=2``), at 60 and 120 particles, each aligned in one batch. The counts are cut per iteration (from one
reconstruction's start to the next: the half maps, FSC, reference and the alignment) and per alignment call
(:func:`gpu_ali3d.standin.profile_local_ali3d`). Budgets (DESIGN.md principle 6, issue 15 item 5):

* no mixing of host and device arrays anywhere;
* syncs per alignment batch <= :data:`SYNCS_PER_BATCH` (measured 2: the checks of the prepared images, the packed
  results coming back);
* no per-image launches: launches (and syncs) per iteration differ between 60 and 120 particles by at most
  :data:`LAUNCH_SLACK` (measured: equal);
* the images go up once, before the first iteration, and stay on the device (refine._resident_images): the
  setup's host -> device bytes are at least the images' float32 bytes and at most twice them plus small tables;
* host -> device bytes per iteration: per particle (the slope between the two sizes) at most
  :data:`H2D_PER_IMAGE` times the image's own float32 bytes (M^2 4; measured 0.06x: its pose, CTF parameters and
  chunk indices; the masking, transforms and CTFs of both the reconstruction and the alignment are made on the
  device); in all at most that multiple of the images' bytes plus the per-iteration volume uploads that do not
  grow with the particles (the band-limited reference once, at most its whole padded cube, and two float64
  volumes of masks and tables).
* device -> host bytes per iteration: the three M^3 maps, the poses and scores, small tables.

Under mpiexec each rank also takes its own stand-in device (the node-local rank: rank r -> device r of 2), and the
poses equal the serial stand-in run's bit for bit (the deterministic insertion sums exactly, so the host sum over
the ranks is the device sum of one rank).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpu_ali3d import kernels, parallel
from gpu_ali3d.io.formats import write_stack
from gpu_ali3d.simulate import phantom, simulate
from gpu_ali3d.standin import profile_local_ali3d

BOX = 32
SIZES = (60, 120)
OPTIONS = dict(maxit=2, CTF=True)
#: Syncs per alignment batch (one launch of kernels/align.cu per batch; the results come back in one copy).
SYNCS_PER_BATCH = 2
#: Launches per iteration may differ between the two particle counts by this much (none expected: every launch
#: is per batch, half set, map or iteration, and both sizes align in one batch).
LAUNCH_SLACK = 2
#: Host -> device bytes per particle and iteration, in units of the particle's float32 image (M^2 4 bytes).
H2D_PER_IMAGE = 0.5
#: Syncs per iteration (measured 7, printed by the test: the maps back, the deterministic insertion's shell scales,
#: the alignment batch's image checks and results).
SYNCS_PER_ITERATION = 12


def _stack(n):
    stack, _ = simulate(phantom(BOX), n, apix_A=4.0, snr=10.0, angle_error_deg=4.0, shift_error_px=1.5, ctf=True,
                        rng=np.random.default_rng(8))
    return stack


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The stand-in runs at both sizes; the larger one's stack also as a file, for the MPI run."""
    tmp = tmp_path_factory.mktemp("budget")
    out = {}
    for n in SIZES:
        stack = _stack(n)
        write_stack(stack, tmp / f"sim{n}.star")
        out[n] = profile_local_ali3d(str(tmp / f"sim{n}.star"), tmp / f"out{n}", **OPTIONS)
    return tmp, out


def _image_bytes(n):
    return n * BOX * BOX * 4


def _reference_upload(counts) -> int:
    """Bytes the alignment's reference uploaded (kernels.band_reference: the deapodised map; the band is made there)."""
    return sum(v for site, v in counts.sites["h2d"].items() if site.endswith(" band_reference"))


def _fixed_h2d_allowance() -> int:
    """Per-iteration uploads that do not grow with the particle count: the reference at most as its whole padded
    cube (complex64, KB halo) and its window table, and two float64 volumes of masks and tables."""
    n, h = 2 * BOX, 3
    cube = 8 * (n + 2 * h + 1) ** 2 * (n // 2 + 1 + 2 * h) + 4 * (kernels.KB_TABLE_SIZE + 1)
    return cube + 2 * 8 * BOX ** 3


def _report(label, prof, n):
    lines = [f"\n{label}: {n} particles, box {BOX}, images {_image_bytes(n)} B, alignment batches {prof.batches}"]
    for i, c in enumerate(prof.iterations):
        what = "final reconstruction" if i == len(prof.iterations) - 1 else "reconstruction + alignment"
        lines.append(f"  iteration {i + 1} ({what}): launches {c.launches}, syncs {c.syncs}, h2d {c.h2d_bytes} B "
                     f"({c.h2d_bytes / _image_bytes(n):.2f} x images; reference {_reference_upload(c)} B), "
                     f"d2h {c.d2h_bytes} B, kernels {dict(c.kernels)}, {prof.wall_s[i]:.2f} s")
    for i, (a, b) in enumerate(zip(prof.alignments, prof.batches)):
        lines.append(f"  alignment {i + 1}: {a.syncs / b:.1f} syncs and {a.launches / b:.1f} launches per batch, "
                     f"h2d {a.h2d_bytes} B, d2h {a.d2h_bytes} B")
    return "\n".join(lines)


def _check_alignment_batches(prof):
    assert prof.batches and all(b >= 1 for b in prof.batches)
    for a, b in zip(prof.alignments, prof.batches):
        assert a.mixing_errors == 0
        assert a.syncs <= SYNCS_PER_BATCH * b, a.summary(6)
        assert len(a.kernels) == 1 and next(iter(a.kernels)).startswith("align"), dict(a.kernels)
        assert sum(a.kernels.values()) == b


def test_serial_budgets(serial, capsys):
    _, runs = serial
    small, large = (runs[n] for n in SIZES)
    with capsys.disabled():
        for n in SIZES:
            print(_report("local_ali3d --device gpu on the stand-in", runs[n], n))
    for n, prof in runs.items():
        assert sum(c.mixing_errors for c in [prof.setup, *prof.iterations]) == 0
        assert prof.devices_used == [0]
        assert _image_bytes(n) <= prof.setup.h2d_bytes <= 2 * _image_bytes(n) + _fixed_h2d_allowance(), \
            prof.setup.summary()            # the images, once
        _check_alignment_batches(prof)
        for c in prof.iterations:
            assert c.syncs <= SYNCS_PER_ITERATION, c.summary(8)
            assert c.h2d_bytes <= H2D_PER_IMAGE * _image_bytes(n) + _fixed_h2d_allowance(), c.summary()
            # d2h: the three M^3 float64 maps, the packed alignment results (9 float64 per particle), small tables
            assert c.d2h_bytes <= 4 * 8 * BOX ** 3 + 72 * n
    assert small.batches == large.batches          # the same batch count, so launches compare like for like
    assert len(small.iterations) == len(large.iterations) == OPTIONS["maxit"] + 1
    growth = SIZES[1] - SIZES[0]
    for i, (a, b) in enumerate(zip(small.iterations, large.iterations)):
        assert abs(b.launches - a.launches) <= LAUNCH_SLACK, (i, a.launches, b.launches)   # no per-image launches
        assert b.syncs == a.syncs, (i, a.syncs, b.syncs)
        assert b.kernels == a.kernels
        # per particle, with the reference's upload (data-dependent band, O(M^3)) left out of the slope
        slope = ((b.h2d_bytes - _reference_upload(b)) - (a.h2d_bytes - _reference_upload(a))) / growth
        with capsys.disabled():
            print(f"  iteration {i + 1}: h2d per added particle {slope:.0f} B = {slope / (BOX * BOX * 4):.2f} x its "
                  f"image; launches {a.launches} -> {b.launches}")
        assert slope <= H2D_PER_IMAGE * BOX * BOX * 4


RANK_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from gpu_ali3d import parallel
from gpu_ali3d.standin import make_standin, profile_local_ali3d

stack, outdir = sys.argv[1], Path(sys.argv[2])
comm = parallel.world()
prof = profile_local_ali3d(stack, outdir, xp=make_standin(n_devices=2), maxit={maxit}, CTF={ctf})
np.save(outdir.parent / f"poses_rank{{comm.rank}}.npy", prof.result.poses)
print("COUNTS " + json.dumps({{
    "rank": comm.rank, "size": comm.size, "local_rank": comm.local_rank(), "devices_used": prof.devices_used,
    "batches": prof.batches, "mixing": sum(c.mixing_errors for c in [prof.setup, *prof.iterations]),
    "iterations": [c.as_dict() for c in prof.iterations],
    "reference_h2d": [sum(v for s, v in c.sites["h2d"].items() if s.endswith(" band_reference"))
                      for c in prof.iterations],
    "alignments": [c.as_dict() for c in prof.alignments],
    "align_kernels": [sum(c.kernels.values()) for c in prof.alignments]}}), flush=True)
"""


@pytest.mark.mpi
def test_mpi_budgets_and_one_device_per_rank(serial, mpiexec, capsys):
    tmp, runs = serial
    n = SIZES[1]
    script = tmp / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT.format(maxit=OPTIONS["maxit"], ctf=OPTIONS["CTF"])))
    env = {k: v for k, v in os.environ.items() if k not in parallel._LAUNCHER_HINT_VARS + parallel._LOCAL_RANK_VARS}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), str(tmp / f"sim{n}.star"),
                          str(tmp / "mpi" / "out")], capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = sorted((json.loads(line.split(" ", 1)[1]) for line in res.stdout.splitlines()
                    if line.startswith("COUNTS ")), key=lambda d: d["rank"])
    assert [d["rank"] for d in ranks] == [0, 1] and all(d["size"] == 2 for d in ranks)
    lo_hi = [parallel.block(n, r, 2) for r in range(2)]
    with capsys.disabled():
        print(f"\nlocal_ali3d --device gpu on the stand-in under mpiexec -n 2 ({n} particles, box {BOX}):")
        for d in ranks:
            mine = lo_hi[d["rank"]][1] - lo_hi[d["rank"]][0]
            print(f"  rank {d['rank']} (local rank {d['local_rank']}, devices used {d['devices_used']}, "
                  f"{mine} particles):")
            for i, c in enumerate(d["iterations"]):
                print(f"    iteration {i + 1}: launches {c['launches']}, syncs {c['syncs']}, h2d {c['h2d_bytes']} B "
                      f"({c['h2d_bytes'] / _image_bytes(mine):.2f} x its images), d2h {c['d2h_bytes']} B")
            for a, b in zip(d["alignments"], d["align_kernels"]):
                print(f"    alignment: {a['syncs'] / b:.1f} syncs per batch, {b} batch(es)")
    for d in ranks:
        mine = lo_hi[d["rank"]][1] - lo_hi[d["rank"]][0]
        assert d["local_rank"] == d["rank"] and d["devices_used"] == [d["rank"]]     # its own device
        assert d["mixing"] == 0
        assert d["align_kernels"] == d["batches"] and all(b >= 1 for b in d["batches"])
        for a, b in zip(d["alignments"], d["batches"]):
            assert a["mixing_errors"] == 0 and a["syncs"] <= SYNCS_PER_BATCH * b
        serial_launches = [c.launches for c in runs[n].iterations]
        for i, c in enumerate(d["iterations"]):
            assert c["syncs"] <= SYNCS_PER_ITERATION + 4      # + the two half sets' grids and weights to the host
            assert c["launches"] <= serial_launches[i] + LAUNCH_SLACK    # rank 0 finishes on its host
            assert c["h2d_bytes"] <= H2D_PER_IMAGE * _image_bytes(mine) + _fixed_h2d_allowance()
        poses = np.load(tmp / "mpi" / f"poses_rank{d['rank']}.npy")
        np.testing.assert_array_equal(poses, runs[n].result.poses)
