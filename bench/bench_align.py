"""One alignment pass: the fused kernel (kernels/align.cu, one launch per batch) against the lockstep simplex
(simplex.amoeba_batched driving kernels/score.cu, refine's path before alignment.py), on the same reference.

Run (from the repository root, in the project's environment, with the project's ``../shared`` beside it)::

    python bench/bench_align.py                          # 2,000 particles, box 64, kb and trilinear
    python bench/bench_align.py --dataset DIR --n 500    # an existing make_dataset.py folder, its first 500

What it does:

1. Dataset: ``--dataset DIR`` (a ``../shared/tools/make_dataset.py`` folder: start.star, truth.star), else made
   with that tool from ``../shared/data/ribosome70S_65.mrc`` (``--n`` particles, ``--box``, SNR 0.1, starts 4 deg
   and 1.5 px off) into ``bench/runs/align_<n>_<box>`` (git-ignored).
2. Reference, as refinement's first iteration makes it: half maps from the start poses (CTF on), masked FSC,
   ``ref_ali3d`` (normalise, mask, tanh low-pass fitted to the FSC) and its (cut-off, fall-off). Not timed.
3. For each interpolation, both paths on the CPU backend with the default options (delta 2, ts 2, SPARX's serial
   controls, the band limit and batch of :func:`gpu_ali3d.alignment.align_poses`): wall time of the whole
   alignment (image preparation included, the kernels built and cached beforehand; the fastest of ``--repeat``
   runs of the two paths in turn, as other work on a shared machine only slows a run down), evaluations and steps; the
   median angular and shift difference between the two results, and each one's median angular error against
   truth.star (gauge removed).
Output: a table on stdout and JSON in ``bench/results/align_<host>.json`` (host = $BENCH_HOST, else the host
name; or ``--out``).
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
SHARED = ROOT.parent / "shared"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", type=Path, help="a make_dataset.py folder (default: made in bench/runs)")
    ap.add_argument("--n", type=int, default=2000, help="particles (made, or the first n of --dataset)")
    ap.add_argument("--box", type=int, default=64, help="box of a made dataset")
    ap.add_argument("--interpolations", nargs="+", default=["kb", "trilinear"], choices=["kb", "trilinear"])
    ap.add_argument("--repeat", type=int, default=1, help="time each path this many times, report the fastest")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/align_<host>.json)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bench.bench_score import machine_info

    dataset = a.dataset or _make_dataset(a.n, a.box)
    images, start, truth, ctf, apix, volf, tanh = _reference(dataset, a.n)
    rows = []
    print(f"{len(images)} particles, box {images.shape[-1]}, tanh low-pass {tanh[0]:.3f} / {tanh[1]:.3f}, "
          f"{os.environ.get('OMP_NUM_THREADS', os.cpu_count())} threads")
    print(f"{'interp':9s} {'path':9s} {'time s':>8s} {'evals':>9s} {'steps/img':>9s} {'evals/s':>9s} "
          f"{'err deg':>8s}")
    for interp in a.interpolations:
        row = _compare(images, start, truth, ctf, apix, volf, tanh, interp, max(1, a.repeat))
        rows.append(row)
        for path in ("lockstep", "fused"):
            r = row[path]
            print(f"{interp:9s} {path:9s} {r['seconds']:8.2f} {r['evaluations']:9d} {r['steps_per_image']:9.1f} "
                  f"{r['evaluations'] / r['seconds']:9.0f} {r['median_error_deg']:8.3f}")
        print(f"{interp:9s} speed-up {row['speedup']:.2f}x; fused vs lockstep: median "
              f"{row['median_angle_diff_deg']:.2g} deg, {row['median_shift_diff_px']:.2g} px (90th percentile "
              f"{row['p90_angle_diff_deg']:.2g} deg)")
    host = os.environ.get("BENCH_HOST") or socket.gethostname().split(".")[0] or "local"
    out = a.out or ROOT / "bench" / "results" / f"align_{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rel = dataset.relative_to(ROOT) if dataset.is_relative_to(ROOT) else dataset.name
    out.write_text(json.dumps(dict(benchmark="align: fused simplex kernel against the lockstep simplex",
                                   date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine_info(),
                                   dataset=str(rel), n=len(images), box=int(images.shape[-1]),
                                   omp_threads=os.environ.get("OMP_NUM_THREADS"), repeat=a.repeat,
                                   load_average=list(os.getloadavg()), tanh=list(tanh), rows=rows),
                              indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


def _make_dataset(n: int, box: int) -> Path:
    folder = ROOT / "bench" / "runs" / f"align_{n}_{box}"
    if not (folder / "start.star").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_dataset.py"), "--n", str(n), "--box", str(box),
                        str(SHARED / "data" / "ribosome70S_65.mrc"), str(folder)], check=True,
                       stdout=subprocess.DEVNULL)
    return folder


def _reference(dataset: Path, n: int):
    """The first n particles, their start and true poses, and the reference of a first iteration (module doc)."""
    from gpu_ali3d.backend import make_backend
    from gpu_ali3d.io.formats import read_stack
    from gpu_ali3d.reconstruct import reconstruct_halves
    from gpu_ali3d.resolution import fit_tanh, fsc_mask, sphere_mask
    from gpu_ali3d.user_functions import ref_ali3d

    stack, truth = read_stack(dataset / "start.star"), read_stack(dataset / "truth.star")
    n = min(n, len(stack))
    images = stack.read_images(slice(0, n))
    start, ctf = stack.poses[:n], stack.ctf[np.arange(n)]
    box = images.shape[-1]
    mask = sphere_mask(box, box // 2 - 2)
    even, odd, full = reconstruct_halves(images, start, ctf=ctf, apix_A=stack.apix_A, backend=make_backend("cpu"))
    curve = fsc_mask(even, odd, mask)
    volf, _ = ref_ali3d([mask, 0, full, curve])
    return images, start, truth.poses[:n], ctf, stack.apix_A, volf, fit_tanh(curve)


def _compare(images, start, truth, ctf, apix, volf, tanh, interpolation: str, repeat: int) -> dict:
    from gpu_ali3d.accuracy import gauge_free_angle_errors
    from gpu_ali3d.alignment import align_poses
    from gpu_ali3d.backend import make_backend
    from gpu_ali3d.geometry import angular_distance, shift_distance
    from gpu_ali3d.options import RefineOptions

    backend = make_backend("cpu")
    for module in ("score", "align"):
        backend.kernels.load(module)                  # build or find in the cache before timing
    opts = RefineOptions(interpolation=interpolation)
    ou = images.shape[-1] // 2 - 2
    row = {"interpolation": interpolation}
    results, times, out = {}, {"lockstep": [], "fused": []}, {}
    for _ in range(repeat):                           # interleaved, so a busy spell slows both paths alike
        for path, fn in (("lockstep", _lockstep_align), ("fused", align_poses)):
            t0 = time.perf_counter()
            out[path] = fn(images, start, volf, ctf, apix, ou, opts, *tanh, backend, False, path)
            times[path].append(time.perf_counter() - t0)
    for path in ("lockstep", "fused"):
        new, before, after, kmax, work = out[path]
        results[path] = new
        row[path] = dict(seconds=min(times[path]), all_seconds=times[path], evaluations=int(work[0]),
                         steps_per_image=float(work[1]) / len(images), criterion_before=float(before.mean()),
                         criterion_after=float(after.mean()),
                         median_error_deg=float(np.median(gauge_free_angle_errors(new, truth))))
    row["kmax_px"] = float(kmax)
    row["median_start_error_deg"] = float(np.median(gauge_free_angle_errors(start, truth)))
    angle = angular_distance(results["fused"], results["lockstep"])
    row["median_angle_diff_deg"] = float(np.median(angle))
    row["p90_angle_diff_deg"] = float(np.percentile(angle, 90))
    row["median_shift_diff_px"] = float(np.median(shift_distance(results["fused"], results["lockstep"])))
    row["speedup"] = row["lockstep"]["seconds"] / row["fused"]["seconds"]
    return row


def _lockstep_align(images, poses, volf, ctf, apix, ou, opts, cutoff, falloff, backend, progress, label):
    """refine._align as it was before alignment.py: amoeba_batched in lockstep on the host, each batch of
    evaluations one launch of kernels/score.cu. Same signature and return value as align_poses."""
    from gpu_ali3d.alignment import IMAGE_PAD, alignment_band_limit, alignment_batch, normalise_poses
    from gpu_ali3d.gridding import prepare_reference
    from gpu_ali3d.kernels import kernel_reference
    from gpu_ali3d.score import make_objective, prepare_images
    from gpu_ali3d.simplex import SPARX_SERIAL, amoeba_batched, local_ali3d_scales

    xp = backend.xp
    ref = prepare_reference(volf, pad=2, interpolation=opts.interpolation)
    kmax = ref.N * alignment_band_limit(cutoff, falloff, images.shape[-1])
    kref = kernel_reference(backend, ref, kmax=kmax)
    new, before, after = np.empty_like(poses), np.empty(len(poses)), np.empty(len(poses))
    work = np.zeros(2, dtype=np.int64)
    size = alignment_batch(len(poses), images.shape[-1], opts.batch, device_free=backend.free_memory_bytes(),
                           samples=int(np.pi * (kmax / ref.N * images.shape[-1]) ** 2 / 2) + 1)
    for start in range(0, len(poses), size):
        sl = slice(start, min(start + size, len(poses)))
        prep = prepare_images(images[sl], ou, ctf=ctf[np.arange(sl.start, sl.stop)] if ctf is not None else None,
                              apix_A=apix, kmax=kmax, image_pad=IMAGE_PAD)
        score_pairs = make_objective(kref, prep, backend=backend)

        def objective(points, owner):
            work[0] += points.shape[0]
            return score_pairs(points, owner)

        x0 = xp.asarray(poses[sl])
        f0 = objective(x0, xp.arange(len(x0)))
        scales = local_ali3d_scales(x0[:, 1], opts.delta, opts.ts, xp=xp)
        best, fbest, steps = amoeba_batched(objective, x0, scales, xp=xp, **SPARX_SERIAL)
        best, fbest, x0, f0, steps = (backend.to_host(a) for a in (best, fbest, x0, f0, steps))
        work[1] += int(steps.sum())
        worse = fbest < f0
        best[worse], fbest[worse] = x0[worse], f0[worse]
        new[sl], before[sl], after[sl] = normalise_poses(best), f0, fbest
    return new, before, after, kmax, work


if __name__ == "__main__":
    sys.exit(main())
