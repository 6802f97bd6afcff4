"""MPI: strong scaling of ``gpu-ali3d refine`` on this machine, and a model of the per-iteration communication.

Run (from the repository root, in an environment with mpi4py and an ``mpiexec`` beside python, e.g.
``pip install -e ".[mpi]" mpich``)::

    python bench/bench_mpi.py                    # 200 simulated particles, box 48, one alignment iteration
    python bench/bench_mpi.py --n 400 --box 64 --ranks 1 2 4

Strong scaling: the same simulated stack is refined (``--maxit 1 --CTF``, trilinear) with 1 rank x 1 OpenMP
thread, 1 rank x 2 threads and N ranks x 1 thread, each a fresh process; wall time of the whole command and the
final poses' largest difference from the 1-rank run are reported (they must be 0: results do not depend on the
rank count).

Communication model (what :mod:`gpu_ali3d.parallel` sends per iteration and chunk, host memory, no NCCL):

* every rank but the root sends its two half-set accumulators to the root: complex128 data (16 B) and float64
  weights (8 B) on the padded half grid Np x Np x (Np/2 + 1), Np = npad * box: ``24 * Np^2 (Np/2 + 1)`` bytes per
  half, 2 halves; the root receives them one rank after another (a fixed order, so the sum's bits do not depend
  on timing) and adds them;
* the root broadcasts the filtered map (float64 box^3) and the poses are all-gathered (5 float64 per particle,
  plus two scores): small beside the accumulators.
The root's ingest, ``(ranks - 1) * 48 * Np^2 (Np/2 + 1)`` bytes, is the term that grows with the rank count; the
table gives it and the time it takes at an assumed link bandwidth (``--link-GBps``, default 12.5 GB/s, one
100 Gb/s InfiniBand port) for 2, 8 and 64 ranks. A fixed-order pairwise tree would cut the root's ingest to
log2(ranks) accumulator pairs at the same reproducibility; this model says when that is worth doing.

Output: a table on stdout and JSON in bench/results/mpi_<host>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def accumulator_bytes(box: int, npad: int = 2) -> int:
    """Bytes of one half-set accumulator (complex128 data + float64 weights on the padded half grid)."""
    n = npad * box
    return 24 * n * n * (n // 2 + 1)


def comm_model(boxes, ranks, npad: int, link_GBps: float, n_particles: int) -> list[dict]:
    rows = []
    for box in boxes:
        acc = accumulator_bytes(box, npad)
        for r in ranks:
            sent = 2 * acc if r > 1 else 0                                  # per non-root rank
            root_in = (r - 1) * 2 * acc
            bcast = 8 * box ** 3
            poses = n_particles * 7 * 8
            tree_in = math.ceil(math.log2(r)) * 2 * acc if r > 1 else 0
            rows.append(dict(box=box, npad=npad, ranks=r, sent_per_rank_MB=sent / 1e6, root_ingest_MB=root_in / 1e6,
                             map_bcast_MB=bcast / 1e6, poses_allgather_MB=poses / 1e6,
                             root_ingest_s=root_in / (link_GBps * 1e9), tree_root_ingest_s=tree_in / (link_GBps * 1e9)))
    return rows


def strong_scaling(n: int, box: int, ranks: list[int], seed: int) -> list[dict]:
    from gpu_ali3d.io.formats import read_stack, write_stack
    from gpu_ali3d.simulate import phantom, simulate

    exe = Path(sys.executable).with_name("gpu-ali3d")
    mpiexec = Path(sys.executable).with_name("mpiexec")
    if not mpiexec.is_file():
        found = shutil.which("mpiexec")
        mpiexec = Path(found) if found else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stack, _ = simulate(phantom(box), n, apix_A=4.0, snr=1.0, angle_error_deg=4.0, shift_error_px=1.5, ctf=True,
                            rng=np.random.default_rng(seed))
        write_stack(stack, tmp / "sim.star")
        args = ["refine", str(tmp / "sim.star"), None, "--maxit", "1", "--CTF", "--interpolation", "trilinear"]
        configs = [(1, 1), (1, 2)] + [(r, 1) for r in ranks if r > 1]
        baseline = None
        for n_ranks, threads in configs:
            out = tmp / f"out_{n_ranks}x{threads}"
            cmd = [str(exe), *[str(out) if a is None else a for a in args]]
            if n_ranks > 1:
                if mpiexec is None:
                    print("no mpiexec found: skipping the MPI runs", file=sys.stderr)
                    break
                cmd = [str(mpiexec), "-n", str(n_ranks), *cmd]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            poses = read_stack(out / "particles.star").poses
            baseline = poses if baseline is None else baseline
            rows.append(dict(ranks=n_ranks, threads=threads, wall_s=wall,
                             max_pose_diff=float(np.abs(poses - baseline).max())))
    t1 = rows[0]["wall_s"]
    for r in rows:
        r["speedup_vs_1x1"] = t1 / r["wall_s"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--box", type=int, default=48)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--link-GBps", type=float, default=12.5)
    p.add_argument("--out", default=None)
    a = p.parse_args()

    scaling = strong_scaling(a.n, a.box, a.ranks, a.seed)
    print(f"strong scaling: {a.n} particles, box {a.box}, refine --maxit 1 --CTF (trilinear), {os.cpu_count()} cores")
    print(f"{'ranks':>5} {'threads':>7} {'wall s':>8} {'speedup':>8} {'max |pose diff|':>16}")
    for r in scaling:
        print(f"{r['ranks']:5d} {r['threads']:7d} {r['wall_s']:8.1f} {r['speedup_vs_1x1']:8.2f} {r['max_pose_diff']:16.3g}")

    model = comm_model([64, 128, 256], [2, 8, 64], 2, a.link_GBps, 100_000)
    print(f"\ncommunication per iteration and chunk (npad 2, 100,000 particles, link {a.link_GBps:g} GB/s)")
    print(f"{'box':>4} {'ranks':>5} {'sent/rank MB':>13} {'root in MB':>11} {'root in s':>10} {'tree s':>7} "
          f"{'map bcast MB':>13} {'poses MB':>9}")
    for m in model:
        print(f"{m['box']:4d} {m['ranks']:5d} {m['sent_per_rank_MB']:13.0f} {m['root_ingest_MB']:11.0f} "
              f"{m['root_ingest_s']:10.2f} {m['tree_root_ingest_s']:7.2f} {m['map_bcast_MB']:13.1f} "
              f"{m['poses_allgather_MB']:9.1f}")

    host = os.environ.get("BENCH_HOST") or socket.gethostname().split(".")[0] or "local"
    out = Path(a.out) if a.out else Path(__file__).parent / "results" / f"mpi_{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                                                python=platform.python_version(), numpy=np.__version__),
                                   args={k: v for k, v in vars(a).items() if k != 'out'}, strong_scaling=scaling, comm_model=model), indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
