"""Objective evaluations per second: the numpy reference (``score.score``) against the compiled CPU kernel
(``score.make_objective(ref, prep, backend=make_backend("cpu"))``, kernels/score.cu built with OpenMP), beside the
bound an H100 would reach by a roofline model.

One evaluation = one (image, pose) pair: the normalised correlation over all kept Fourier samples of the image.

Run (from the repository root, in the project's environment)::

    python bench/bench_score.py                      # box 64 and 128, KB and trilinear, 1 and 2 threads
    python bench/bench_score.py --boxes 64 --pairs 500 --threads 1 2 4

Every configuration (box, interpolation, threads) runs in its own subprocess with OMP_NUM_THREADS (and the BLAS
thread variables) set, so the thread count takes effect. All configurations of one box use the same random map,
images and poses (fixed seeds): box M, ``prepare_images(ou = M/2 - 2)``, no CTF (the kernel reads no CTF array:
slightly less traffic than with CTF), resolution limit kmax = N/2 (Nyquist of the padded grid N = 2M: every sample
of the half plane within the disc, about pi M^2 / 2 samples); poses are uniform angles and shifts within +-3 px,
each image scored against ``pairs / images`` poses (``--pairs`` per box: 1000 at 64, 250 at 128). The kernel's
CPU build is compiled (or found in the cache) and warmed up before timing; each path is timed over whole batches,
repeated until at least ``--min-seconds``. The reference path runs on the first ``--ref-pairs`` pairs (200 at 64,
40 at 128), and the kernel's scores on those pairs are compared with it (max |difference| reported: float32
interpolation against float64).
Output: a table on stdout and JSON in bench/results/score_<host>.json (host = $BENCH_HOST, else the hostname; or
give --out) with the machine (CPU model, cores, numpy/python, compiler), every timing, and the roofline.

Roofline of the GPU kernel (the same kernels/score.cu, one block per pair, threads over samples)
------------------------------------------------------------------------------------------------
Per evaluation, with S kept samples and T taps per axis (KB: K = 6, T^3 = 216; trilinear: T^3 = 8):

* taps: S * T^3 complex64 reads of the reference, 8 B each (every tap counted; the caches' reuse between the
  neighbouring samples of a block is ignored, so the byte counts are upper bounds);
* per sample: the image's complex64 value (8 B) and, with CTF, a float32 CTF value (4 B): 12 B from HBM (counted
  with CTF, as in refinement); freqs and weights (12 B per sample) are shared by all pairs and stay in L2;
* FLOPs per sample (FP32, an FMA = 2): KB weights 3 T lanes x ~6 (index, two table reads, one lerp) = 108; the
  separable contraction 4 (T^3 + T^2 + T) = 1032 for K = 6; rotation, phase (a product of two tabulated
  factors), CTF, correlation and |P|^2 ~ 60.
  Trilinear: weights ~ 6 x 3, contraction 4 (8 + 4 + 2) = 56, the rest ~ 60. (The kernel also does a few FP64
  operations per tap lane, the distance u - j and its division by K/2; H100 FP64 is 34 TFLOP/s, FP64 division is
  much slower: not in this bound.)
* H100 SXM: HBM 3.35 TB/s, L2 50 MB, FP32 67 TFLOP/s (non-tensor). L2 bandwidth is not a datasheet figure;
  microbenchmarks give ~5.5 TB/s, used here (``L2_BW``).
* The reference volume is complex64 (N + 2h + 1)^2 (N/2 + 1 + 2h), h = T/2: 10.4 MB at box 64 (N = 128, KB),
  74.7 MB at box 128 (N = 256). Box 64: L2-resident, so tap reads cost L2 bandwidth and only the per-sample image
  and CTF reads cost HBM: bound = min(HBM / (12 S), L2_BW / (8 S T^3), FP32 / FLOPs). Box 128: not resident,
  every tap read from HBM: bound = min(HBM / (S (8 T^3 + 12)), FP32 / FLOPs).
This bound ignores launch overhead, the simplex between evaluations and host transfers: it is an upper limit for
the kernel alone, meant to say how far the CPU figures are from what the same source could do on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
#: H100 SXM figures of the roofline (module docstring).
HBM_BW = 3.35e12
L2_BYTES = 50e6
L2_BW = 5.5e12
FP32_FLOPS = 67e12
#: FP32 work per sample outside the interpolation: rotation, phase ramp, CTF, correlation (module docstring).
OTHER_FLOPS = 60
KB_LANE_FLOPS = 6                      # kernels/gridding.cuh kb_weight: a table lerp per tap lane
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--interpolations", nargs="+", default=["kb", "trilinear"], choices=["kb", "trilinear"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pairs", type=int, nargs="+", default=[1000, 250],
                        help="(image, pose) pairs per kernel batch, per box (the last repeats)")
    parser.add_argument("--ref-pairs", type=int, nargs="+", default=[200, 40],
                        help="pairs of the reference path, per box (the last repeats)")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/score_<host>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)    # internal: one configuration, JSON on stdout
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0

    rows = []
    for b, box in enumerate(args.boxes):
        pairs = args.pairs[min(b, len(args.pairs) - 1)]
        ref_pairs = min(pairs, args.ref_pairs[min(b, len(args.ref_pairs) - 1)])
        for interp in args.interpolations:
            for threads in args.threads:
                config = dict(box=box, interpolation=interp, threads=threads, pairs=pairs,
                              ref_pairs=ref_pairs, images=args.images, min_seconds=args.min_seconds)
                env = {**os.environ, **{v: str(threads) for v in THREAD_VARS}}
                proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(config)], env=env,
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr)
                    return 1
                row = json.loads(proc.stdout.splitlines()[-1])
                row["roofline_h100"] = roofline(box, interp, row["samples"])
                row["samples_per_s"] = row["kernel_evals_per_s"] * row["samples"]
                if row.get("gpu_evals_per_s"):
                    row["gpu_fraction_of_h100_bound"] = row["gpu_evals_per_s"] / row["roofline_h100"][
                        "bound_evals_per_s"]
                rows.append(row)
                if len(rows) == 1:
                    print(_header())
                print(_format_row(row), flush=True)
    host = os.environ.get("BENCH_HOST") or socket.gethostname() or "local"
    out = args.out or HERE / "results" / f"score_{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(benchmark="score: objective evaluations per second", date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  machine=machine_info(), h100_model=dict(hbm_bytes_per_s=HBM_BW, l2_bytes=L2_BYTES,
                                                          l2_bytes_per_s_assumed=L2_BW, fp32_flops=FP32_FLOPS),
                  rows=rows)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0


def roofline(box: int, interpolation: str, samples: int) -> dict:
    """The H100 bound of one configuration (module docstring): evaluations/s and the numbers behind it."""
    n = 2 * box
    taps = 6 if interpolation == "kb" else 2
    h = taps // 2
    volume_bytes = 8 * (n + 2 * h + 1) ** 2 * (n // 2 + 1 + 2 * h)
    t3 = taps ** 3
    if interpolation == "kb":
        flops_sample = 3 * taps * KB_LANE_FLOPS + 4 * (t3 + taps ** 2 + taps) + OTHER_FLOPS
    else:
        flops_sample = 6 * 3 + 4 * (t3 + taps ** 2 + taps) + OTHER_FLOPS
    tap_bytes = 8 * t3 * samples
    sample_bytes = 12 * samples
    flops = flops_sample * samples
    l2_resident = volume_bytes <= L2_BYTES
    bounds = {"fp32": FP32_FLOPS / flops}
    if l2_resident:
        bounds["hbm"] = HBM_BW / sample_bytes
        bounds["l2"] = L2_BW / tap_bytes
    else:
        bounds["hbm"] = HBM_BW / (tap_bytes + sample_bytes)
    limit = min(bounds, key=bounds.get)
    return dict(volume_MB=volume_bytes / 1e6, l2_resident=l2_resident, taps_per_eval=t3 * samples,
                tap_bytes_per_eval=tap_bytes, image_ctf_bytes_per_eval=sample_bytes, flops_per_eval=flops,
                bounds_evals_per_s=bounds, bound_evals_per_s=bounds[limit], limited_by=limit)


def machine_info() -> dict:
    """CPU model, cores, python, numpy, compiler (the one the kernels are built with)."""
    from gpu_ali3d import kernels
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cxx = kernels.host_compiler()
        compiler = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (RuntimeError, OSError, IndexError):
        compiler = None
    return dict(cpu=model, cores=os.cpu_count(), affinity=len(os.sched_getaffinity(0)) if hasattr(
        os, "sched_getaffinity") else None, machine=platform.machine(), system=platform.platform(),
        python=platform.python_version(), numpy=np.__version__, compiler=compiler,
        cpu_flags={name: " ".join(kernels.cpu_flags(name)) for name in kernels.kernel_names()})


# ----------------------------------------------------------------------------------------------- helpers
def _worker(config: dict) -> dict:
    from gpu_ali3d.backend import gpu_available, make_backend
    from gpu_ali3d.gridding import prepare_reference
    from gpu_ali3d.score import make_objective, prepare_images, score

    box, interp = config["box"], config["interpolation"]
    rng = np.random.default_rng(box)                       # same data for every configuration of a box
    volume = rng.standard_normal((box, box, box))
    images = rng.standard_normal((config["images"], box, box))
    n_pairs = config["pairs"]
    owner = np.arange(n_pairs, dtype=np.int64) % config["images"]
    poses = np.column_stack([rng.uniform(0, 360, n_pairs), np.degrees(np.arccos(rng.uniform(-1, 1, n_pairs))),
                             rng.uniform(0, 360, n_pairs), rng.uniform(-3, 3, (n_pairs, 2))])

    t0 = time.perf_counter()
    ref = prepare_reference(volume, interpolation=interp)
    prep = prepare_images(images, box / 2 - 2)
    t_prepare = time.perf_counter() - t0
    m = config["ref_pairs"]
    t0 = time.perf_counter()
    objective = make_objective(ref, prep, backend=make_backend("cpu"))
    kernel_scores = objective(poses[:m], owner[:m])        # compiles or loads the CPU build, warms up
    t_first = time.perf_counter() - t0
    kernel_rate, _ = _rate(lambda: objective(poses, owner), n_pairs, config["min_seconds"])
    reference_rate, ref_scores = _rate(lambda: score(ref, prep, poses[:m], image_index=owner[:m]), m,
                                       config["min_seconds"])
    gpu_rate = None
    if config["threads"] == 1 and gpu_available():          # the same source on the GPU, once per box and interp
        gpu = make_backend("gpu")
        gpu_objective = make_objective(ref, prep, backend=gpu)
        gp, go = gpu.xp.asarray(poses), gpu.xp.asarray(owner)
        gpu.to_host(gpu_objective(gp, go))                  # compile, warm up
        gpu_rate, _ = _rate(lambda: gpu.to_host(gpu_objective(gp, go)), n_pairs, config["min_seconds"])
    return dict(box=box, interpolation=interp, threads=config["threads"], gpu_evals_per_s=gpu_rate,
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"), samples=int(len(prep.freqs)),
                kernel_pairs=n_pairs, reference_pairs=m, kernel_evals_per_s=kernel_rate,
                reference_evals_per_s=reference_rate, speedup=kernel_rate / reference_rate,
                max_abs_diff=float(np.max(np.abs(kernel_scores - ref_scores))),
                prepare_s=t_prepare, first_call_s=t_first)


def _rate(fn, n: int, min_seconds: float):
    """Evaluations per second of ``fn`` (n evaluations per call), repeated for at least min_seconds; and fn()."""
    calls, t0 = 0, time.perf_counter()
    while True:
        result = fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return calls * n / elapsed, result


def _header() -> str:
    return (f"{'box':>4} {'interp':>9} {'thr':>3} {'samples':>7} | {'reference/s':>11} {'kernel/s':>9} "
            f"{'samples/s':>9} {'speedup':>7} {'max|diff|':>9} | {'GPU/s':>8} {'H100 bound/s':>12} {'limit':>5} "
            f"{'ref in L2':>9}\n" + "-" * 120)


def _format_row(r: dict) -> str:
    rf = r["roofline_h100"]
    gpu = f"{r['gpu_evals_per_s']:>8.3g}" if r.get("gpu_evals_per_s") else f"{'-':>8}"
    return (f"{r['box']:>4} {r['interpolation']:>9} {r['threads']:>3} {r['samples']:>7} | "
            f"{r['reference_evals_per_s']:>11.1f} {r['kernel_evals_per_s']:>9.1f} {r['samples_per_s']:>9.3g} "
            f"{r['speedup']:>7.1f} {r['max_abs_diff']:>9.1e} | {gpu} {rf['bound_evals_per_s']:>12.3g} "
            f"{rf['limited_by']:>5} {'yes' if rf['l2_resident'] else 'no':>9}")


if __name__ == "__main__":
    sys.exit(main())
