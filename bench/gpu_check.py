"""The GPU check (issue 15 item 6): what to run, in under 5 minutes, the day a GPU machine is available.

Run (from the repository root, in the project's environment with the ``[cuda12]`` or ``[cuda13]`` extra)::

    python bench/gpu_check.py                         # every part, about 4 minutes on one GPU
    python bench/gpu_check.py --skip tests model      # some parts
    python bench/gpu_check.py --device 1 --out bench/runs/check.json

Parts, in order (each timed; one failing does not stop the others):

1. ``tests``: ``python -m pytest -q -m gpu`` (the GPU twins of the kernel, alignment and reconstruction tests,
   which are skipped on machines without a GPU), with a time limit.
2. ``score``: kernel throughput against the roofline: bench/bench_score.py at box 64 and 128, both interpolations,
   one CPU thread (its GPU column: the score kernel on this GPU, as a fraction of the H100 bound).
3. ``align``: the fused alignment kernel (kernels/align.cu: a whole simplex per block) on this GPU: evaluations
   per second at box 64 and 128, both interpolations, against the same roofline bound at its samples per image.
4. ``refine``: ``gpu-ali3d refine --CTF --maxit 2`` on a small simulated set (the built-in phantom, box 64, 500
   particles, CTF, SNR 0.1) with ``--device gpu`` and ``--device cpu``: seconds per iteration of each and the
   median angular / shift difference between their final poses (the same algorithm; differences come from float
   rounding: cuFFT against scipy's FFT, the order of block sums).
5. ``model``: bench/bench_gpu_model.py's prediction for the first iteration of the same refinement (from the strict
   stand-in's counts) beside the GPU's measured seconds, so the model's constants can be corrected.

Output: a line per part, and JSON in ``bench/results/gpu_check_<host>.json`` (host = $BENCH_HOST, else the host
name; or --out): the machine and the GPU (name, compute capability, memory, CUDA runtime and driver versions, CuPy),
every part's results, and ``ok``. Exit status: 0 when every part that ran passed (tests pass, both refinements
finish and agree: median angle difference below ``--max-angle-diff``), 1 when one failed, 3 at once when no CUDA
device is usable (one line on stderr saying why; nothing runs), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

PARTS = ("tests", "score", "align", "refine", "model")
#: Exit status when no CUDA device is usable.
NO_GPU = 3
#: Time limits of the subprocess parts (seconds); the whole check stays under 5 minutes on one GPU.
TESTS_TIMEOUT_S = 120
SCORE_TIMEOUT_S = 90
REFINE_TIMEOUT_S = 150


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip", nargs="+", default=[], choices=PARTS, metavar="PART",
                    help=f"parts to leave out: {' '.join(PARTS)}")
    ap.add_argument("--device", type=int, default=0, help="CUDA device number (default 0)")
    ap.add_argument("--n", type=int, default=500, help="particles of the refine part (default 500)")
    ap.add_argument("--box", type=int, default=64, help="box of the refine part (default 64)")
    ap.add_argument("--max-angle-diff", type=float, default=0.05,
                    help="largest median angle difference (degrees) between the GPU and CPU refinements")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/gpu_check_<host>.json)")
    a = ap.parse_args(argv)
    if a.n < 20 or a.box < 24:
        ap.error("--n must be at least 20 and --box at least 24")
    return a


def gpu_problem() -> str | None:
    """None when CuPy imports and sees a CUDA device; else why not, in one line (without starting any work)."""
    try:
        import cupy
    except ImportError as err:
        return f"cupy does not import ({err}); install the [cuda12] or [cuda13] extra"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:          # no driver, insufficient driver, no device node
        return f"cupy cannot reach a CUDA device ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if n < 1:
        return "cupy sees no CUDA device"
    return None


def main(argv=None) -> int:
    a = parse_args(argv)
    problem = gpu_problem()
    if problem is not None:
        print(f"gpu_check: no usable CUDA device: {problem}; nothing was run", file=sys.stderr)
        return NO_GPU
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu_check.")) if a.work is None else a.work
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", str(a.device))}
    from bench_score import machine_info

    report = dict(check="gpu_check", date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine_info(),
                  gpu=gpu_info(a.device), parts={})
    runners = dict(tests=lambda: part_tests(env), score=lambda: part_score(work, env),
                   align=lambda: part_align(a.device), refine=lambda: part_refine(work, env, a),
                   model=lambda: part_model(work, report["parts"].get("refine"), a))
    for name in PARTS:
        if name in a.skip:
            continue
        t0 = time.perf_counter()
        try:
            result = runners[name]()
        except Exception as err:         # a part that breaks is reported, the others still run
            result = dict(ok=False, error=f"{type(err).__name__}: {err}")
        result["wall_s"] = time.perf_counter() - t0
        report["parts"][name] = result
        print(f"{name:7s} {'ok  ' if result.get('ok') else 'FAIL'} {result['wall_s']:6.1f} s  {result.get('line', '')}"
              f"{result.get('error', '')}", flush=True)
    report["wall_s"] = time.perf_counter() - t_start
    report["ok"] = all(p.get("ok") for p in report["parts"].values())
    host = os.environ.get("BENCH_HOST") or socket.gethostname() or "local"
    out = a.out or ROOT / "bench" / "results" / f"gpu_check_{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=_plain) + "\n")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'ok' if report['ok'] else 'FAILED'} in {report['wall_s']:.0f} s; wrote {_rel(out)}")
    return 0 if report["ok"] else 1


# ----------------------------------------------------------------------------------------------- parts
def gpu_info(device: int) -> dict:
    import cupy

    with cupy.cuda.Device(device):
        props = cupy.cuda.runtime.getDeviceProperties(device)
        free, total = cupy.cuda.runtime.memGetInfo()
    name = props.get("name", b"")
    return dict(device=device, name=name.decode() if isinstance(name, bytes) else str(name),
                compute_capability=f"{props.get('major')}.{props.get('minor')}", memory_bytes=int(total),
                free_bytes=int(free), multiprocessors=props.get("multiProcessorCount"),
                runtime=cupy.cuda.runtime.runtimeGetVersion(), driver=cupy.cuda.runtime.driverGetVersion(),
                cupy=cupy.__version__)


def part_tests(env) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    proc = _run(cmd, env, TESTS_TIMEOUT_S)
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    return dict(ok=proc.returncode == 0, returncode=proc.returncode, summary=summary, line=summary,
                tail=proc.stdout[-4000:])


def part_score(work: Path, env) -> dict:
    out = work / "score.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_score.py"), "--boxes", "64", "128", "--threads", "1",
           "--pairs", "2000", "500", "--ref-pairs", "40", "8", "--min-seconds", "1", "--out", str(out)]
    proc = _run(cmd, env, SCORE_TIMEOUT_S)
    if proc.returncode != 0 or not out.is_file():
        return dict(ok=False, returncode=proc.returncode, error=proc.stderr.strip()[-2000:])
    rows = json.loads(out.read_text())["rows"]
    keep = [dict(box=r["box"], interpolation=r["interpolation"], samples=r["samples"],
                 gpu_evals_per_s=r.get("gpu_evals_per_s"), h100_bound_evals_per_s=r["roofline_h100"][
                     "bound_evals_per_s"], fraction_of_bound=r.get("gpu_fraction_of_h100_bound"),
                 cpu_kernel_evals_per_s=r["kernel_evals_per_s"], max_abs_diff=r["max_abs_diff"]) for r in rows]
    ok = all(k["gpu_evals_per_s"] for k in keep)
    line = ", ".join(f"{k['box']}/{k['interpolation']} {_frac(k['fraction_of_bound'])}" for k in keep)
    return dict(ok=ok, rows=keep, line=f"score kernel, fraction of the H100 bound: {line}")


def part_align(device: int) -> dict:
    from gpu_ali3d.backend import make_backend

    backend = make_backend("gpu")
    backend.xp.cuda.Device(device).use()
    rows = [align_throughput(backend, box, interp) for box in (64, 128) for interp in ("kb", "trilinear")]
    line = ", ".join(f"{r['box']}/{r['interpolation']} {r['evals_per_s']:.3g}/s ({_frac(r['fraction_of_bound'])})"
                     for r in rows)
    return dict(ok=all(r["evals_per_s"] > 0 for r in rows), rows=rows, line=f"align kernel: {line}")


def align_throughput(backend, box: int, interpolation: str, n: int = 2000, repeats: int = 2, seed: int = 0) -> dict:
    """Evaluations per second of one align kernel launch over n noisy images at box ``box`` (full band, CTF),
    the best of ``repeats`` timed launches after a warm-up; and the roofline bound (bench_gpu_model.align_bound,
    H100) at its samples per image. Runs on any backend (the tests run it on the stand-in)."""
    from bench_gpu_model import GPUS, align_bound

    from gpu_ali3d import gridding, kernels, score, simplex
    from gpu_ali3d.alignment import align_kernel
    from gpu_ali3d.ctf import CTFParams

    rng = np.random.default_rng(seed)
    vol = rng.standard_normal((box, box, box))
    ref = gridding.prepare_reference(vol, interpolation=interpolation)
    images = rng.standard_normal((n, box, box)).astype(np.float32)
    ctf = CTFParams(rng.uniform(10000, 30000, n), rng.uniform(10000, 30000, n), rng.uniform(0, 180, n), 300.0, 2.7,
                    0.1, 0.0)
    prep = score.prepare_images(images, box / 2 - 2, ctf=ctf, apix_A=2.0, kmax=ref.N / 2, image_pad=1)
    xp = backend.xp
    kref = kernels.kernel_reference(backend, ref, kmax=prep.kmax)
    kimg = kernels.kernel_images(backend, prep)
    x0 = np.column_stack([rng.uniform(0, 360, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                          rng.uniform(0, 360, n), rng.uniform(-1, 1, (n, 2))])
    scales = simplex.local_ali3d_scales(x0[:, 1], 2.0, 2.0)
    dx0, dscales = xp.asarray(x0), xp.asarray(scales)
    best = None
    for i in range(repeats + 1):                  # the first launch warms up (and compiles on a GPU)
        t0 = time.perf_counter()
        out = align_kernel(backend, kref, kimg, dx0, dscales, check_scales=False, **simplex.SPARX_SERIAL)
        evals = int(backend.to_host(out[3]).sum())        # the copy back waits for the kernel
        elapsed = time.perf_counter() - t0
        if i and (best is None or elapsed < best[0]):
            best = (elapsed, evals)
    elapsed, evals = best
    samples = int(kimg.data.shape[1])
    bound = align_bound(box, interpolation, samples, GPUS["h100"])
    rate = evals / elapsed
    return dict(box=box, interpolation=interpolation, images=n, samples=samples, evaluations=evals,
                seconds=elapsed, evals_per_s=rate, h100_bound_evals_per_s=bound, fraction_of_bound=rate / bound)


def part_refine(work: Path, env, a) -> dict:
    from gpu_ali3d.geometry import angular_distance, shift_distance
    from gpu_ali3d.io.formats import read_stack

    stack = make_check_stack(work, a.n, a.box)
    runs = {}
    for device in ("gpu", "cpu"):
        out = work / f"refine_{device}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "gpu_ali3d.cli", "refine", str(stack), str(out), "--CTF", "--maxit", "2",
               "--device", device]
        proc = _run(cmd, env, REFINE_TIMEOUT_S)
        if proc.returncode != 0:
            return dict(ok=False, error=f"refine --device {device} failed ({proc.returncode}): "
                                        f"{proc.stderr.strip()[-1500:]}")
        records = json.loads((out / "summary.json").read_text())
        aligned = [r for r in records if r.get("criterion_after") is not None]
        runs[device] = dict(seconds_per_iteration=float(np.mean([r["wall_s"] for r in aligned])),
                            first_iteration_s=aligned[0]["wall_s"], records=records, outdir=str(out))
    gpu_poses = read_stack(Path(runs["gpu"]["outdir"]) / "particles.star").poses
    cpu_poses = read_stack(Path(runs["cpu"]["outdir"]) / "particles.star").poses
    diff = pose_difference(gpu_poses, cpu_poses, angular_distance, shift_distance)
    ok = diff["median_angle_deg"] < a.max_angle_diff
    speed = runs["cpu"]["seconds_per_iteration"] / runs["gpu"]["seconds_per_iteration"]
    line = (f"{a.n} particles, box {a.box}: GPU {runs['gpu']['seconds_per_iteration']:.2f} s/iteration, CPU "
            f"{runs['cpu']['seconds_per_iteration']:.2f} ({speed:.1f}x); median difference "
            f"{diff['median_angle_deg']:.4f} deg / {diff['median_shift_px']:.4f} px")
    return dict(ok=ok, stack=str(stack), runs={k: {kk: vv for kk, vv in v.items() if kk != "outdir"}
                                                for k, v in runs.items()}, difference=diff, speedup=speed, line=line)


def pose_difference(a: np.ndarray, b: np.ndarray, angular_distance, shift_distance) -> dict:
    """Median and maximum angular (degrees) and shift (pixels) differences between two (n, 5) pose arrays."""
    ang, sh = angular_distance(a, b), shift_distance(a, b)
    return dict(median_angle_deg=float(np.median(ang)), max_angle_deg=float(np.max(ang)),
                median_shift_px=float(np.median(sh)), max_shift_px=float(np.max(sh)))


def make_check_stack(work: Path, n: int, box: int) -> Path:
    """The refine part's data: the built-in phantom, n particles, box, CTF, SNR 0.1 (seed 1), as a STAR stack."""
    from gpu_ali3d.io.formats import write_stack
    from gpu_ali3d.simulate import phantom, simulate

    path = work / f"check_{box}_{n}.star"
    if not path.is_file():
        stack, _ = simulate(phantom(box, np.random.default_rng(1)), n, apix_A=3.0, snr=0.1, angle_error_deg=4.0,
                            shift_error_px=1.5, ctf=True, rng=np.random.default_rng(1))
        write_stack(stack, path)
    return path


def part_model(work: Path, refine: dict | None, a) -> dict:
    """The model's prediction for the refine part's first iteration, beside the GPU's measured seconds."""
    from bench_gpu_model import GPUS, counts_of, predict

    from gpu_ali3d.options import RefineOptions
    from gpu_ali3d.standin import profile_local_ali3d

    stack = make_check_stack(work, a.n, a.box)
    out = work / "model_standin"
    shutil.rmtree(out, ignore_errors=True)
    prof = profile_local_ali3d(str(stack), out, maxit=1, CTF=True)
    it = prof.iterations[0]
    row = dict(host_s=prof.host_cpu_s[0], evaluations=int(prof.result.records[0].evaluations),
               **counts_of(it, prof.alignments[0], prof.batches[0]))
    gpu_name = report_gpu_name()
    model = GPUS["h200" if "H200" in gpu_name else "h100"]
    pred = predict(row, a.box, RefineOptions().interpolation, model)
    measured = None if not refine or not refine.get("ok") else refine["runs"]["gpu"]["first_iteration_s"]
    line = (f"first iteration: predicted {pred['total_s']:.2f} s ({model['name']} model), measured "
            f"{'-' if measured is None else f'{measured:.2f}'} s")
    return dict(ok=True, predicted=pred, measured_s=measured, model=model["name"], counts=row, line=line)


def report_gpu_name() -> str:
    try:
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice()).get("name", b"")
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return ""


# ----------------------------------------------------------------------------------------------- helpers
def _run(cmd, env, timeout) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, out, f"timed out after {timeout} s: {' '.join(map(str, cmd))}")


def _frac(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _plain(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON: {type(x).__name__}")


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    sys.exit(main())
