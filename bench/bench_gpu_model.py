"""Predicted GPU time per iteration, from what the GPU host path pays on the strict CuPy stand-in.

Run (from the repository root, in the project's environment)::

    python bench/bench_gpu_model.py                        # box 64 (200, 400) and 128 (100, 200): about 2 minutes
    python bench/bench_gpu_model.py --boxes 64 --n 200 400 --target-n 100000 --gpu h200

For each box and particle count: ``local_ali3d(..., device="gpu", maxit=1, CTF=True)`` on the stand-in
(:func:`gpu_ali3d.standin.profile_local_ali3d`: the GPU host path with the CPU kernel build behind the GPU launch
interface) and, beside it, the same refinement on the CPU backend (``device="cpu"``), whose seconds per iteration are
the measured column. An iteration is the first one (the two half maps and the full map, FSC, reference, and the
alignment of every particle). Data as bench_scaling.py's (the 70S ribosome of ../shared/data when it is there, else
the built-in phantom; CTF, SNR 0.1, starts 4 degrees / 1.5 px off; stacks kept in ``--work``).

What is recorded per iteration (the stand-in's counts): launches, syncs, host->device copies and bytes, device->host
bytes; the library operations' device memory traffic (operands + results) and the FFTs' (by transform: 2-D batched
image transforms, 3-D grids); per custom kernel its work: alignment, samples per image S x objective evaluations;
insertion, samples x images x symmetry mates (x 8 voxels, trilinear); the fixed-point finish, grid voxels. Host
time: the iteration's CPU time in the calling thread on the stand-in minus that spent executing device work
(``RefineProfile.host_cpu_s``; thread CPU time, so that other work on a shared machine does not inflate it; the
wall-clock difference is kept too, ``host_wall_s``): what stays on the host (the reference's preparation, the
images' preparation and CTF planes, FSC, filters, files) and a GPU does not shorten.

The model (constants in :data:`GPUS`, printed and written with the results):

* launch: 5 us per launch; sync: 10 us per sync and per host->device copy (a pageable copy blocks the host);
* PCIe: 25 GB/s each way;
* library operations (elementwise, reductions, gathers): their bytes at 80 % of the HBM bandwidth;
* FFTs (cuFFT): 3-D grids (the finish's 256^3 irfftn at box 128) in 3 passes over the data, 2-D batched image
  transforms in 1 pass, at 50 % of the HBM bandwidth (FP64 FLOPs are far from binding: 2 GFLOP per 256^3);
* alignment kernel: the evaluations at bench_score.py's roofline bound (H100 SXM; an H200 has 4.8 TB/s of HBM, the
  same FP32 and L2) for this box, interpolation and S; the simplex's own float64 bookkeeping is not in the bound;
* insertion: each contribution is 3 float64 atomic adds (real, imaginary, weight) at 1e11 atomics/s, or 128 bytes
  of HBM traffic (two 32-byte sectors read and written), whichever is slower, plus reading the transforms and CTF^2
  planes (12 bytes per plane element); the fixed-point finish (insert_unscale): 96 bytes per grid voxel;
* host: as measured here (2 cores), fitted per particle;
* no overlap: the parts add (the host path waits for every result it reads).

A small warm-up run comes first (imports and kernel loads are paid there, not in the smallest size's host
time). Extrapolation to ``--target-n`` particles (100,000 by default) at each box: every count and byte total is fitted
as a + b n over the measured sizes (least squares); the alignment's batches are sized as on the GPU
(:func:`gpu_ali3d.alignment.alignment_batch` with the GPU's memory), and their launches, syncs and copies counted
per batch; the alignment's samples per image are those of the full band (Nyquist: with 100,000 particles the
resolution limit approaches it; the small runs stop far below), evaluations per particle as measured.

Output: a table on stdout and JSON in ``bench/results/gpu_model_<host>.json`` (host = $BENCH_HOST, else the host
name; or --out) with the machine, the constants, every measured count, the fits and the predictions.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_score  # noqa: E402
from bench_score import machine_info  # noqa: E402

#: The model's GPUs (module docstring). hbm: bytes/s; memory: bytes; the FP32 and L2 figures are bench_score's.
GPUS = {
    "h100": dict(name="H100 SXM", hbm=bench_score.HBM_BW, memory=80e9),
    "h200": dict(name="H200 SXM", hbm=4.8e12, memory=141e9),
}
#: Latencies and rates shared by both (module docstring).
MODEL = dict(launch_s=5e-6, sync_s=10e-6, pcie_bytes_per_s=25e9, elementwise_efficiency=0.8, fft_efficiency=0.5,
             fft_passes_3d=3, fft_passes_2d=1, atomics_per_s=1e11, atomics_per_contribution=3,
             bytes_per_contribution=128, plane_bytes_per_element=12, unscale_bytes_per_voxel=96)
DEFAULT_N = {64: [200, 400], 128: [100, 200]}
#: Time components, in the table's order.
PARTS = ("host", "launch", "sync", "pcie", "library", "fft", "align", "insert")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 128], choices=[64, 128])
    ap.add_argument("--n", type=int, nargs="+", help="particle counts per box, at least two (default: 200 400 at "
                    "box 64, 100 200 at box 128)")
    ap.add_argument("--target-n", type=int, default=100_000)
    ap.add_argument("--interpolation", choices=["kb", "trilinear"], help="default: RefineOptions' default")
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU backend runs (the measured column)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "runs" / "gpu_model")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.n is not None and len(set(a.n)) < 2:
        ap.error("--n needs at least two different particle counts (the fit)")
    from gpu_ali3d.options import RefineOptions

    interpolation = a.interpolation or RefineOptions().interpolation
    gpu = GPUS[a.gpu]
    a.work.mkdir(parents=True, exist_ok=True)
    rows, targets, fits = [], [], {}
    print(f"model: {gpu['name']} ({gpu['hbm'] / 1e12:.2f} TB/s HBM), launch {MODEL['launch_s'] * 1e6:.0f} us, "
          f"sync {MODEL['sync_s'] * 1e6:.0f} us, PCIe {MODEL['pcie_bytes_per_s'] / 1e9:.0f} GB/s; "
          f"interpolation {interpolation}", flush=True)
    warm_up(a.work, a.boxes[0], interpolation)
    for box in a.boxes:
        sizes = sorted(set(a.n or DEFAULT_N[box]))
        measured = []
        for n in sizes:
            m = measure(a.work, box, n, interpolation, cpu=not a.no_cpu)
            m["predicted"] = predict(m, box, interpolation, gpu)
            measured.append(m)
            rows.append(m)
            print(_line(m), flush=True)
        fit = fit_counts(measured)
        fits[str(box)] = fit
        t = extrapolate(fit, measured, box, a.target_n, interpolation, gpu)
        t["predicted"] = predict(t, box, interpolation, gpu)
        targets.append(t)
        print(_line(t), flush=True)
    print()
    print(table(rows + targets))
    host = os.environ.get("BENCH_HOST") or socket.gethostname() or "local"
    out = a.out or ROOT / "bench" / "results" / f"gpu_model_{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(benchmark="gpu_model: predicted GPU time per iteration from the stand-in's counts",
                  date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine_info(), gpu=gpu, model=MODEL,
                  interpolation=interpolation, target_n=a.target_n, rows=rows, fits=fits, targets=targets)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {_rel(out)}")
    return 0


# ----------------------------------------------------------------------------------------------- measuring
def warm_up(work: Path, box: int, interpolation: str, n: int = 20) -> None:
    """One small run of each kind first, not recorded: the first run of a process pays imports (STAR, plotting)
    and kernel loads, which would otherwise land in the smallest size's host time and bend the fit."""
    measure(work, box, n, interpolation, cpu=True)


def measure(work: Path, box: int, n: int, interpolation: str, *, cpu: bool = True) -> dict:
    """One stand-in run (and one CPU run) at (box, n): the first iteration's counts, work, host and wall times."""
    from bench_scaling import _map, _stack

    from gpu_ali3d import local_ali3d
    from gpu_ali3d.standin import profile_local_ali3d

    stack = _stack(work, _map(work, box), box, n)
    options = dict(maxit=1, CTF=True, interpolation=interpolation)
    out = work / f"standin_{box}_{n}_{interpolation}"
    shutil.rmtree(out, ignore_errors=True)
    prof = profile_local_ali3d(str(stack), out, **options)
    it, align = prof.iterations[0], prof.alignments[0]
    rec = prof.result.records[0]
    row = dict(box=box, n=n, kind="measured", stack=_rel(stack), batches=prof.batches[0],
               standin_s=prof.wall_s[0], host_s=prof.host_cpu_s[0],
               host_wall_s=max(0.0, prof.wall_s[0] - it.device_s), device_cpu_s=it.device_s,
               evaluations=int(rec.evaluations), kmax_px=rec.kmax_px, **counts_of(it, align, prof.batches[0]))
    if cpu:
        out = work / f"cpu_{box}_{n}_{interpolation}"
        shutil.rmtree(out, ignore_errors=True)
        res = local_ali3d(str(stack), out, device="cpu", progress=False, **options)
        row["cpu_s"] = res.records[0].wall_s
    return row


def counts_of(it, align, batches: int) -> dict:
    """The model's inputs from one iteration's Counts (``it``) and its alignment's (``align``, ``batches``)."""
    fft2d = fft3d = 0
    for name, (din, sin), (dout, sout) in it.fft_calls:
        nbytes = np.dtype(din).itemsize * math.prod(sin) + np.dtype(dout).itemsize * math.prod(sout)
        if name.endswith("2") or len(sin) < 3:
            fft2d += nbytes
        else:
            fft3d += nbytes
    samples = contributions = plane_bytes = voxels = 0
    for name, _blocks, args in it.kernel_calls:
        arrays = [x for x in args if isinstance(x, tuple)]
        if name.startswith("align"):
            samples = max(samples, next(s[1] for d, s in arrays if d == "<c8" and len(s) == 2))   # data (n, S)
        elif name == "insert":
            trans = next(s for d, s in arrays if d == "<c8" and len(s) == 3)                     # (n, L, L/2+1)
            mates = next(s for d, s in arrays if len(s) == 4)                                    # (n, k, 3, 3)
            kept = next(s[0] for d, s in arrays if d == "<i4" and len(s) == 1)                   # samples (s,)
            trilinear = args[-1] == 1
            contributions += kept * trans[0] * mates[1] * (8 if trilinear else 1)
            plane_bytes += MODEL["plane_bytes_per_element"] * math.prod(trans)
        elif name == "insert_unscale":
            voxels += math.prod(arrays[0][1])
    return dict(launches=it.launches, syncs=it.syncs, h2d_copies=it.h2d_copies, h2d_bytes=it.h2d_bytes,
                d2h_bytes=it.d2h_bytes, library_bytes=it.device_bytes - it.fft_bytes, fft2d_bytes=fft2d,
                fft3d_bytes=fft3d, align_samples=samples, insert_contributions=contributions,
                insert_plane_bytes=plane_bytes, unscale_voxels=voxels,
                align_launches=align.launches / batches, align_syncs=align.syncs / batches,
                align_h2d_copies=align.h2d_copies / batches, kernels=dict(it.kernels))


# ----------------------------------------------------------------------------------------------- the model
def predict(m: dict, box: int, interpolation: str, gpu: dict) -> dict:
    """Seconds per iteration on ``gpu`` for one row of counts (measured or extrapolated), by part (docstring)."""
    hbm = gpu["hbm"]
    parts = dict(
        host=m["host_s"],
        launch=m["launches"] * MODEL["launch_s"],
        sync=(m["syncs"] + m["h2d_copies"]) * MODEL["sync_s"],
        pcie=(m["h2d_bytes"] + m["d2h_bytes"]) / MODEL["pcie_bytes_per_s"],
        library=m["library_bytes"] / (MODEL["elementwise_efficiency"] * hbm),
        fft=(MODEL["fft_passes_3d"] * m["fft3d_bytes"] + MODEL["fft_passes_2d"] * m["fft2d_bytes"])
        / (MODEL["fft_efficiency"] * hbm),
        align=m["evaluations"] / align_bound(box, interpolation, m["align_samples"], gpu) if m["evaluations"] else 0,
        insert=max(MODEL["atomics_per_contribution"] * m["insert_contributions"] / MODEL["atomics_per_s"],
                   MODEL["bytes_per_contribution"] * m["insert_contributions"] / hbm)
        + m["insert_plane_bytes"] / hbm + MODEL["unscale_bytes_per_voxel"] * m["unscale_voxels"] / hbm,
    )
    return dict(parts_s=parts, total_s=sum(parts.values()), gpu_only_s=sum(v for k, v in parts.items() if k != "host"))


def align_bound(box: int, interpolation: str, samples: int, gpu: dict) -> float:
    """Evaluations per second of the alignment kernel: bench_score.roofline's bound (H100), its HBM term scaled to
    ``gpu``'s bandwidth."""
    r = bench_score.roofline(box, interpolation, max(1, int(samples)))
    bounds = dict(r["bounds_evals_per_s"])
    bounds["hbm"] *= gpu["hbm"] / bench_score.HBM_BW
    return min(bounds.values())


FITTED = ("launches", "syncs", "h2d_copies", "h2d_bytes", "d2h_bytes", "library_bytes", "fft2d_bytes",
          "fft3d_bytes", "insert_contributions", "insert_plane_bytes", "unscale_voxels", "host_s", "cpu_s",
          "standin_s", "evaluations")


def fit_counts(rows: list[dict]) -> dict:
    """a + b n for each count (least squares over the sizes); the alignment's per-batch counts taken out first."""
    n = np.array([r["n"] for r in rows], dtype=np.float64)
    out = {}
    for key in FITTED:
        if not all(key in r for r in rows):
            continue
        y = np.array([r[key] - _per_batch(r, key) * r["batches"] for r in rows], dtype=np.float64)
        b, a = np.polyfit(n, y, 1)
        out[key] = dict(a=float(a), b=float(b))
    for key in ("align_launches", "align_syncs", "align_h2d_copies"):
        out[key] = float(np.mean([r[key] for r in rows]))
    return out


def _per_batch(row: dict, key: str) -> float:
    return row.get(f"align_{key}", 0.0) if key in ("launches", "syncs", "h2d_copies") else 0.0


def extrapolate(fit: dict, rows: list[dict], box: int, n: int, interpolation: str, gpu: dict) -> dict:
    """The counts at n particles (module docstring): the fits, the GPU's batches, the full band's samples."""
    from gpu_ali3d.alignment import alignment_batch

    samples = full_band_samples(box)
    batches = math.ceil(n / alignment_batch(n, box, 0, device_free=int(0.9 * gpu["memory"]), samples=samples))
    t = dict(box=box, n=n, kind="extrapolated", batches=batches, align_samples=samples,
             kmax_px=None, measured_samples=[r["align_samples"] for r in rows])
    for key, ab in fit.items():
        if isinstance(ab, dict):
            t[key] = max(0.0, ab["a"] + ab["b"] * n)
    # the host seconds never below the smallest measured: a noisy slope (two timed runs on a shared machine) must
    # not extrapolate the fixed per-iteration host work to nothing
    t["host_s"] = max(t["host_s"], min(r["host_s"] for r in rows))
    for key in ("launches", "syncs", "h2d_copies"):
        t[key] += fit[f"align_{key}"] * batches
    t["unscale_voxels"] = float(np.mean([r["unscale_voxels"] for r in rows]))     # per iteration, not per particle
    t["evaluations"] = n * float(np.mean([r["evaluations"] / r["n"] for r in rows]))
    return t


def full_band_samples(box: int) -> int:
    """Samples per image of the alignment at Nyquist (score.prepare_images with kmax at the band's edge)."""
    from gpu_ali3d.alignment import IMAGE_PAD
    from gpu_ali3d.score import PAD, prepare_images

    noise = np.random.default_rng(0).standard_normal((1, box, box))
    prep = prepare_images(noise, box / 2 - 2, kmax=PAD * box / 2, image_pad=IMAGE_PAD)
    return int(len(prep.freqs))


# ----------------------------------------------------------------------------------------------- output
def _line(r: dict) -> str:
    p = r["predicted"]
    cpu = f", CPU {r['cpu_s']:.2f} s" if r.get("cpu_s") is not None else ""
    return (f"box {r['box']} n {r['n']} ({r['kind']}): predicted GPU {p['total_s']:.3f} s/iteration "
            f"(host {p['parts_s']['host']:.3f} s){cpu}")


def table(rows: list[dict]) -> str:
    head = ("| box | particles | | CPU s/it | stand-in s/it | launches | syncs | h2d MB | d2h MB | "
            + " | ".join(f"{p} s" for p in PARTS) + " | GPU s/it | GPU s/it without host |")
    lines = [head, "| --: | --: | --- | " + " | ".join(["--:"] * (len(PARTS) + 8)) + " |"]
    for r in rows:
        p = r["predicted"]
        lines.append(
            f"| {r['box']} | {r['n']:,} | {r['kind']} | {_num(r.get('cpu_s'))} | {_num(r.get('standin_s'))} | "
            f"{r['launches']:.0f} | {r['syncs']:.0f} | {r['h2d_bytes'] / 1e6:.1f} | {r['d2h_bytes'] / 1e6:.1f} | "
            + " | ".join(f"{p['parts_s'][k]:.3g}" for k in PARTS)
            + f" | {p['total_s']:.3g} | {p['gpu_only_s']:.3g} |")
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    sys.exit(main())
