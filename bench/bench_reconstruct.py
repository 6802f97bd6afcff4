"""Where a reconstruction's time goes: slice transforms, insertion, the three finishes, per insertion and box.

Run (from the repository root, in the project's environment)::

    python bench/bench_reconstruct.py                    # 1,000 particles at box 64 and 128, trilinear and nn4
    python bench/bench_reconstruct.py --n 500 --boxes 128 --insertion trilinear

Data: noise-free CTF projections (defocus 1-3 um, 1.5 A/px, random poses, seed 1) of the 70S map in
``../shared/data`` (box 64) and of the GPCR map (box 128), made once per run with the exact projector
(:func:`gpu_ali3d.projection.project`). What is timed is what ``refine`` does per iteration on one rank, with the
CPU kernels (``--device cpu``): both half sets' accumulation (``reconstruct.accumulate_halves``: slice transforms
on the host plus ``kernels/insert.cu``, batched by ``reconstruct.insert_chunk``) and the three finishes (even, odd,
full). The split inside the accumulation comes from a second pass that only makes the slice transforms
(``reconstruct.slice_transforms`` over the same batches). Each figure is the fastest of ``--repeat`` runs (the
machines here are shared: the minimum is the least disturbed). The FSC against the true map (minimum up to 0.9 of
Nyquist, ``--snr 1``) is printed beside, so a faster variant cannot hide a worse map.

Output: a table on stdout and JSON in ``bench/results/reconstruct_<host>.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_score import machine_info  # noqa: E402

MAPS = {64: ROOT.parent / "shared" / "data" / "relion_sim" / "ref.mrc",
        128: ROOT.parent / "shared" / "data" / "gpcr7cfn_128.mrc"}
APIX_A = 1.5


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="particles (default 1000)")
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 128], choices=sorted(MAPS))
    ap.add_argument("--insertion", nargs="+", default=["trilinear", "nn4"], choices=["trilinear", "nn4"])
    ap.add_argument("--repeat", type=int, default=2, help="runs per point; the fastest is kept (default 2)")
    ap.add_argument("--out", type=Path, help="JSON output (default bench/results/reconstruct_<host>.json)")
    a = ap.parse_args(argv)

    from gpu_ali3d.backend import make_backend
    backend = make_backend("cpu")
    rows = []
    for box in a.boxes:
        vol, images, poses, ctf = _dataset(box, a.n)
        for insertion in a.insertion:
            rows.append(_measure(backend, vol, images, poses, ctf, insertion, a.repeat))
            print(_row(rows[-1]), flush=True)
    print()
    print(table(rows))
    out = a.out or ROOT / "bench" / "results" / f"reconstruct_{os.environ.get('BENCH_HOST') or socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M"),
                               "n": a.n, "rows": rows}, indent=1))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


def _dataset(box: int, n: int):
    from scipy.spatial.transform import Rotation

    from gpu_ali3d.ctf import CTFParams
    from gpu_ali3d.geometry import euler_from_matrix
    from gpu_ali3d.io.formats import read_volume
    from gpu_ali3d.projection import project
    from gpu_ali3d.resolution import sphere_mask

    vol, _ = read_volume(MAPS[box])
    vol = np.asarray(vol, np.float64)[:box, :box, :box]
    vol = (vol - vol.mean()) * sphere_mask(box, 0.45 * box, soft_edge=3)
    vol /= vol.std()
    rng = np.random.default_rng(1)
    phi, theta, psi = euler_from_matrix(Rotation.random(n, random_state=1).as_matrix())
    poses = np.column_stack([phi, theta, psi, np.zeros(n), np.zeros(n)])
    df = rng.uniform(10000, 30000, n)
    ctf = CTFParams(df + rng.uniform(0, 300, n), df, rng.uniform(0, 180, n), 300.0, 2.7, 0.1, 0.0)
    return vol, project(vol, poses, ctf=ctf, apix_A=APIX_A).astype(np.float32), poses, ctf


def _measure(backend, vol, images, poses, ctf, insertion: str, repeat: int) -> dict:
    from gpu_ali3d import reconstruct as rec
    from gpu_ali3d.resolution import fsc

    box, npad = images.shape[-1], 2
    chunk = rec.insert_chunk(box, npad, insertion)
    best = {"accumulate_s": np.inf, "transforms_s": np.inf, "finish_s": np.inf}
    for _ in range(repeat):
        t0 = time.perf_counter()
        accs = rec.accumulate_halves(images, poses, ctf=ctf, apix_A=APIX_A, npad=npad, insertion=insertion,
                                     backend=backend, chunk=chunk, on_device=True)
        t1 = time.perf_counter()
        maps = [rec.finish(accs[0], backend=backend), rec.finish(accs[1], backend=backend),
                rec.finish(rec.add(accs[0], accs[1]), backend=backend)]
        t2 = time.perf_counter()
        for start in range(0, len(images), chunk):             # the transforms alone, over the same batches
            rec.slice_transforms(images[start:start + chunk], poses[start:start + chunk], ctf=ctf[start:start + chunk],
                                 npad=1 if insertion == "trilinear" else npad, apix_A=APIX_A, single=True)
        t3 = time.perf_counter()
        best = {k: min(best[k], v) for k, v in
                (("accumulate_s", t1 - t0), ("finish_s", t2 - t1), ("transforms_s", t3 - t2))}
    curve = np.asarray(fsc(maps[2], vol).fsc)[1:int(0.9 * box / 2) + 1]
    return {"box": box, "insertion": insertion, "n": len(images), **best,
            "insert_s": best["accumulate_s"] - best["transforms_s"],
            "total_s": best["accumulate_s"] + best["finish_s"], "fsc_min_to_0.9_nyquist": float(curve.min())}


def _row(r: dict) -> str:
    return (f"| {r['box']} | {r['insertion']} | {r['transforms_s']:.2f} | {r['insert_s']:.2f} | {r['finish_s']:.2f} | "
            f"{r['total_s']:.2f} | {r['fsc_min_to_0.9_nyquist']:.3f} |")


def table(rows) -> str:
    head = ("| box | insertion | slice transforms s | insertion kernel s | 3 finishes s | total s | "
            "FSC min to 0.9 Nyquist |\n| --: | --- | --: | --: | --: | --: | --: |")
    return "\n".join([head] + [_row(r) for r in rows])


if __name__ == "__main__":
    sys.exit(main())
