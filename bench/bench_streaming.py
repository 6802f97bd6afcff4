"""Stacks larger than memory (issue 12): one refinement in memory and one under a small ``--image-budget``, on the
same data and cores, with their peak memory, seconds per iteration and pose difference.

Run (from the repository root, in the project's environment, with the project's ``../shared`` beside it)::

    python bench/bench_streaming.py                          # 20,000 GPCR particles at box 128, budget 500 MiB
    python bench/bench_streaming.py --n 2000 --budget 50     # smaller
    python bench/bench_streaming.py --dataset DIR            # an existing make_dataset.py folder

What it does:

1. Dataset: ``--dataset DIR``, else ``../shared/tools/make_dataset.py`` on ``../shared/data/gpcr7cfn_128.mrc``
   (``--n`` particles, box 128, 1.5 A/px, SNR 0.05, starts 4 deg / 1.5 px off) into
   ``bench/runs/stream_<n>`` (git-ignored; about 13 s per 1,000 particles).
2. ``gpu-ali3d refine start.star OUT --CTF --maxit K`` twice, each in its own process: with the defaults (the
   images in memory) and with ``--image-budget B`` (read from the stack batch by batch). The stack was read just
   before by the first run, so both read it from the page cache: the comparison is of the work, not of the disk.
3. Peak memory: each process's maximum resident set (``os.wait4``'s ru_maxrss). Seconds per iteration: the mean
   ``wall_s`` of the aligning iterations in summary.json (reconstruction + alignment). Poses: the largest
   difference between the two particles.star (they are expected equal).

Output: a table on stdout and JSON in ``bench/results/streaming_<host>.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_score import machine_info  # noqa: E402  (bench/ is not a package for this script)

DEFAULT_SHARED = ROOT.parent / "shared"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="particles of a new dataset (default 20000)")
    ap.add_argument("--dataset", type=Path, help="an existing make_dataset.py folder (start.star)")
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared folder with tools/ and data/")
    ap.add_argument("--budget", type=int, default=500, help="--image-budget of the streamed run, MiB (default 500)")
    ap.add_argument("--iterations", type=int, default=1, help="--maxit of both runs (default 1)")
    ap.add_argument("--out", type=Path, help="JSON output (default bench/results/streaming_<host>.json)")
    a = ap.parse_args(argv)

    dataset = (a.dataset or ROOT / "bench" / "runs" / f"stream_{a.n}").resolve()
    if not (dataset / "start.star").is_file():
        if a.dataset:
            print(f"{a.dataset}: no start.star there; give a make_dataset.py folder", file=sys.stderr)
            return 2
        subprocess.run([sys.executable, str(a.shared / "tools" / "make_dataset.py"),
                        str(a.shared / "data" / "gpcr7cfn_128.mrc"), str(dataset), "--n", str(a.n), "--snr", "0.05",
                        "--ang-err", "4", "--shift-err", "1.5", "--seed", "5", "--box", "128", "--angpix", "1.5"],
                       check=True, stdout=subprocess.DEVNULL)
    runs = {}
    for name, extra in (("memory", []), ("streamed", ["--image-budget", str(a.budget)])):
        out = dataset / f"bench_{name}"
        if out.exists():
            import shutil
            shutil.rmtree(out)
        runs[name] = _refine(dataset / "start.star", out, a.iterations, extra)
    poses = {name: _star_poses(dataset / f"bench_{name}" / "particles.star") for name in runs}
    result = {"machine": machine_info(), "dataset": str(dataset.relative_to(ROOT) if dataset.is_relative_to(ROOT)
                                                        else dataset),
              "particles": len(poses["memory"]), "budget_MiB": a.budget, "iterations": a.iterations, "runs": runs,
              "max_pose_difference": float(np.abs(poses["memory"] - poses["streamed"]).max()),
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    m, s = runs["memory"], runs["streamed"]
    print(f"\n{result['machine']['cpu']}, {result['machine']['cores']} cores; {result['particles']} particles; "
          f"image budget {a.budget} MiB\n")
    print("| run | peak memory (MiB) | s / iteration | total (s) |")
    print("| --- | --: | --: | --: |")
    for name, r in runs.items():
        print(f"| {name} | {r['peak_rss_MiB']:.0f} | {r['mean_s']:.1f} | {r['total_s']:.1f} |")
    print(f"\nstreamed / memory: peak memory {s['peak_rss_MiB'] - m['peak_rss_MiB']:+.0f} MiB, time per iteration "
          f"{s['mean_s'] / m['mean_s']:.2f}x; largest pose difference {result['max_pose_difference']:.3g}")
    out = a.out or ROOT / "bench" / "results" / f"streaming_{os.environ.get('BENCH_HOST') or socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


def _refine(star: Path, out: Path, iterations: int, extra: list[str]) -> dict:
    """One refine in its own process: its peak resident memory, wall time and seconds per aligning iteration."""
    cmd = [sys.executable, "-m", "gpu_ali3d", "refine", str(star), str(out), "--CTF", "--maxit", str(iterations),
           *extra]
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    total = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {out.parent / (out.name + '.log')}")
    records = json.loads((out / "summary.json").read_text())
    per_it = [r["wall_s"] for r in records if r.get("criterion_after") is not None]
    shown = " ".join(str(Path(c).relative_to(ROOT)) if str(c).startswith(str(ROOT) + os.sep) else str(c)
                     for c in cmd[1:])                      # no machine paths in the results
    return {"command": shown, "peak_rss_MiB": usage.ru_maxrss / 1024, "total_s": total,
            "seconds_per_iteration": per_it, "mean_s": sum(per_it) / len(per_it)}


def _star_poses(path: Path) -> np.ndarray:
    from gpu_ali3d.io.formats import read_stack

    return read_stack(path).poses


if __name__ == "__main__":
    sys.exit(main())
