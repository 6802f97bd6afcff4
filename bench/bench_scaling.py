"""Refinement wall time per iteration against the number of particles and the box size, with peak memory.

Run (from the repository root, in the project's environment)::

    python bench/bench_scaling.py                              # 500 1000 2000 4000 particles, box 64 and 128
    python bench/bench_scaling.py --n 500 1000 --boxes 64 --interpolation kb

Data: ``gpu-ali3d simulate`` (CTF, SNR 0.1, start poses 4 degrees and 1.5 pixels off) of the 70S ribosome map
in ``../shared/data`` when it is there (cropped to 64^3 at 4 A/pixel; for box 128 the same map Fourier-
interpolated to 128^3 at 2 A/pixel, so both boxes hold the same particle), else of the built-in phantom. Each
stack is made once (seed 1) in ``--work`` (default ``bench/runs/scaling``, git-ignored) and reused.

Each point is ``gpu-ali3d refine STACK OUT --CTF --maxit 2 --interpolation I`` in a fresh process (device auto:
the CPU here). Seconds per iteration: the mean ``wall_s`` of the two alignment iterations in OUT/summary.json
(reconstruction, FSC, reference, alignment); also the split between reconstruction and alignment, the objective
evaluations per second, the band limit (Fourier pixels of the box) and the process's peak resident memory
(``ru_maxrss``). The table shows time per particle as well, so linearity reads off one column.

Output: a table on stdout and JSON in ``bench/results/scaling_<host>.json`` (``--out``).
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
from bench_score import machine_info  # noqa: E402

MAP = ROOT.parent / "shared" / "data" / "ribosome70S_65.mrc"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 128], choices=[64, 128])
    ap.add_argument("--interpolation", default="trilinear", choices=["trilinear", "kb"])
    ap.add_argument("--maxit", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "runs" / "scaling")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(header(), flush=True)
    for box in a.boxes:
        map_path = _map(a.work, box)
        for n in a.n:
            stack = _stack(a.work, map_path, box, n)
            row = _refine(stack, a.work / f"run_{box}_{n}_{a.interpolation}", a.interpolation, a.maxit)
            row.update(box=box, n=n, interpolation=a.interpolation)
            rows.append(row)
            print(row_line(row), flush=True)
    result = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "map": "../shared/data/" + MAP.name if MAP.is_file() else "built-in phantom", "rows": rows}
    out = a.out or ROOT / "bench" / "results" / f"scaling_{os.environ.get('BENCH_HOST') or socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


def _map(work: Path, box: int) -> Path | None:
    """The ribosome at this box (64: cropped, 4 A/px; 128: Fourier-interpolated, 2 A/px), or None (phantom)."""
    if not MAP.is_file():
        return None
    import mrcfile

    out = work / f"ribosome_{box}.mrc"
    if out.is_file():
        return out
    vol = mrcfile.read(MAP).astype(np.float64)[:64, :64, :64]
    apix = 4.0
    if box == 128:
        f = np.fft.fftshift(np.fft.fftn(vol))
        big = np.zeros((128,) * 3, complex)
        big[32:96, 32:96, 32:96] = f
        vol = np.fft.ifftn(np.fft.ifftshift(big)).real * 8
        apix = 2.0
    with mrcfile.new(out, overwrite=True) as m:
        m.set_data(vol.astype(np.float32))
        m.voxel_size = apix
    return out


def _stack(work: Path, map_path: Path | None, box: int, n: int) -> Path:
    out = work / f"sim_{box}_{n}.hdf"
    if not out.is_file():
        cmd = [sys.executable, "-m", "gpu_ali3d", "simulate"] + ([str(map_path)] if map_path else [])
        cmd += [str(out), "--n", str(n), "--ctf", "--snr", "0.1", "--seed", "1"]
        if map_path is None:
            cmd += ["--box", str(box)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def _refine(stack: Path, out: Path, interpolation: str, maxit: int) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "gpu_ali3d", "refine", str(stack), str(out), "--CTF", "--maxit", str(maxit),
           "--interpolation", interpolation]
    t0 = time.perf_counter()
    with open(str(out) + ".log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"refine failed: {' '.join(cmd)}; see {out}.log")
    total = time.perf_counter() - t0
    recs = [r for r in json.loads((out / "summary.json").read_text()) if r.get("criterion_after") is not None]
    mean = lambda key: float(np.mean([r[key] for r in recs]))
    return {"seconds_per_iteration": mean("wall_s"), "reconstruct_s": mean("reconstruct_s"),
            "align_s": mean("align_s"), "evaluations_per_s": float(np.sum([r["evaluations"] for r in recs])
                                                                     / np.sum([r["align_s"] for r in recs])),
            "kmax_fourier_px": mean("kmax_px") / 2, "total_s": total, "peak_rss_MiB": usage.ru_maxrss / 1024}


def header() -> str:
    return ("| box | particles | s / iteration | ms / particle | reconstruction s | alignment s | evaluations/s | "
            "band (Fourier px) | peak memory MiB |\n| --: | --: | --: | --: | --: | --: | --: | --: | --: |")


def row_line(r: dict) -> str:
    return (f"| {r['box']} | {r['n']} | {r['seconds_per_iteration']:.1f} | "
            f"{1000 * r['seconds_per_iteration'] / r['n']:.2f} | {r['reconstruct_s']:.1f} | {r['align_s']:.1f} | "
            f"{r['evaluations_per_s']:.0f} | {r['kmax_fourier_px']:.1f} | {r['peak_rss_MiB']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
