"""Peer comparison: gpu-ali3d and RELION 3.1's local auto-refine on the same RELION-simulated particles, one run.

Run (from the repository root, in the project's environment, with the project's ``../shared`` beside it)::

    python bench/bench_relion.py                         # 2,000 particles, box 64, 3 iterations, RELION if installed
    python bench/bench_relion.py --n 500 --no-relion     # ours only
    python bench/bench_relion.py --dataset DIR           # an existing make_dataset.py folder

What it does, in one process so both sides see the same machine:

1. Dataset. ``--dataset DIR``, or made with ``../shared/tools/make_dataset.py`` from
   ``../shared/data/ribosome70S_65.mrc`` (``--n`` particles, SNR 0.1, every start pose 4 degrees and 1.5 pixels
   off; it needs RELION's ``relion_project``) into ``--work`` (default ``bench/runs/relion_<n>``, git-ignored).
   Without RELION and without a dataset the comparison cannot be made: the script says so and exits 0.
2. Ours: ``gpu-ali3d refine start.star OUT --CTF --maxit 3 --interpolation I`` for each ``--interpolation``
   (default trilinear and kb), device auto (the CPU here). Time per iteration: the mean ``wall_s`` of the
   alignment iterations in OUT/summary.json (reconstruction + alignment; the final reconstruction-only pass is
   not an iteration). Error: ``../shared/tools/score.py`` on OUT/particles.star (median angle, gauge removed).
3. RELION: ``../shared/tools/relion_local.sh`` (3 MPI ranks, the Debian RELION 3.1), unless ``--no-relion`` or
   RELION is not installed (then skipped with a message). Time per iteration: the spacing of the
   ``run_itNNN_data.star`` files (iteration k = mtime(k) - mtime(k - 1), k >= 1). Errors: score.py on
   ``run_it003_data.star`` (after 3 iterations, as ours) and on ``run_data.star`` (converged).

The table prints both side by side with the two ratios issue 5 asks for: RELION's seconds per iteration over
ours (target >= 5) and our median error after 3 iterations over RELION's after 3 (target <= 0.85). JSON with the
machine, every time and every score goes to ``bench/results/relion_<host>.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_score import machine_info  # noqa: E402  (bench/ is not a package for this script)

DEFAULT_SHARED = ROOT.parent / "shared"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="particles of a new dataset (default 2000)")
    ap.add_argument("--dataset", type=Path, help="an existing make_dataset.py folder (start.star, truth.star)")
    ap.add_argument("--work", type=Path, help="where to make the dataset and the runs (default bench/runs/relion_N)")
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared folder with tools/ and data/")
    ap.add_argument("--iterations", type=int, default=3, help="our iterations (default 3)")
    ap.add_argument("--interpolation", nargs="+", default=["trilinear", "kb"], choices=["trilinear", "kb"])
    ap.add_argument("--no-relion", action="store_true", help="do not run RELION")
    ap.add_argument("--out", type=Path, help="JSON output (default bench/results/relion_<host>.json)")
    a = ap.parse_args(argv)

    tools = a.shared / "tools"
    work = (a.work or ROOT / "bench" / "runs" / f"relion_{a.n}").resolve()
    have_relion = shutil.which("relion_refine_mpi") is not None and shutil.which("mpirun") is not None
    dataset = a.dataset.resolve() if a.dataset else work / "dataset"
    work.mkdir(parents=True, exist_ok=True)
    if not (dataset / "start.star").is_file():
        if a.dataset:
            print(f"{a.dataset}: no start.star there; give a make_dataset.py folder", file=sys.stderr)
            return 2
        if not (shutil.which("relion_project") and (tools / "make_dataset.py").is_file()):
            print("skipped: making the RELION-simulated dataset needs RELION (relion_project; apt-get install relion "
                  f"openmpi-bin) and {tools / 'make_dataset.py'}; or give --dataset")
            return 0
        _run([sys.executable, tools / "make_dataset.py", a.shared / "data" / "ribosome70S_65.mrc", dataset,
              "--n", a.n, "--seed", 1], log=work / "make_dataset.log")

    result = {"machine": machine_info(), "dataset": _shown(dataset), "iterations": a.iterations, "ours": {},
              "relion": None, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    result["machine"]["relion"] = _relion_version() if have_relion else None
    start = _score(tools, dataset, dataset / "start.star")
    result["start"] = start
    for interp in a.interpolation:
        out = work / f"ours_{interp}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        _run([sys.executable, "-m", "gpu_ali3d", "refine", dataset / "start.star", out, "--CTF", "--maxit", a.iterations,
              "--interpolation", interp], log=work / f"ours_{interp}.log")
        total = time.perf_counter() - t0
        records = json.loads((out / "summary.json").read_text())
        per_it = [r["wall_s"] for r in records if r.get("criterion_after") is not None]
        result["ours"][interp] = {"seconds_per_iteration": per_it, "mean_s": sum(per_it) / len(per_it),
                                  "total_s": total, "score": _score(tools, dataset, out / "particles.star")}

    if a.no_relion or not have_relion:
        print("RELION: skipped (" + ("--no-relion" if a.no_relion else
                                     "relion_refine_mpi / mpirun not found: apt-get install relion openmpi-bin")
              + ")")
    else:
        rdir = dataset / "relion_bench"
        shutil.rmtree(rdir, ignore_errors=True)
        t0 = time.perf_counter()
        _run(["bash", tools / "relion_local.sh", dataset, "relion_bench"], log=work / "relion.log", system_mpi=True)
        total = time.perf_counter() - t0
        its = sorted(rdir.glob("run_it[0-9][0-9][0-9]_data.star"))
        mtimes = [p.stat().st_mtime for p in its]
        per_it = [b - a_ for a_, b in zip(mtimes, mtimes[1:])]
        n3 = min(a.iterations, len(its) - 1)
        result["relion"] = {"seconds_per_iteration": per_it, "mean_s_first": sum(per_it[:n3]) / max(n3, 1),
                            "iterations_to_converge": len(its) - 1, "total_s": total,
                            "score_it": {int(p.name[6:9]): _score(tools, dataset, p) for p in its[1:n3 + 1]},
                            "score_converged": _score(tools, dataset, rdir / "run_data.star")}

    add_ratios(result)
    s0 = result["start"]
    print(f"\n{result['machine']['cpu']}, {result['machine']['cores']} cores; dataset {result['dataset']}; start "
          f"{s0['angle_deg']['median']:.3f} deg / {s0['shift_px']['median']:.3f} px; errors after "
          f"{a.iterations} iterations\n")
    print("\n".join(table(result)))
    out = a.out or ROOT / "bench" / "results" / f"relion_{os.environ.get('BENCH_HOST') or socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


def _shown(path: Path) -> str:
    """A path as the report records it: relative to the repository (or its parent) when inside, else as given."""
    for base, prefix in ((ROOT, ""), (ROOT.parent, "../")):
        try:
            return prefix + str(Path(path).resolve().relative_to(base))
        except ValueError:
            continue
    return str(path)


def _run(cmd, *, log: Path, system_mpi: bool = False) -> None:
    """Run cmd with its output in log. system_mpi: without this environment's bin/ on PATH, so that RELION's
    ``mpirun`` is the system MPI it was built with (Open MPI), not the MPICH wheel's launcher beside python."""
    cmd = [str(c) for c in cmd]
    print("+", " ".join(cmd), flush=True)
    env = None
    if system_mpi:
        own = str(Path(sys.executable).parent)
        env = dict(os.environ, PATH=os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                                                     if d and d != own))
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def _score(tools: Path, dataset: Path, star: Path) -> dict:
    """score.py's JSON (its last line): median/mean/p90 angle (gauge removed) and shift of ``star``."""
    proc = subprocess.run([sys.executable, str(tools / "score.py"), str(dataset), str(star)], capture_output=True,
                          text=True, check=True)
    full = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"angle_deg": full["result"]["angle_deg"], "shift_px": full["result"]["shift_px"]}


def _relion_version() -> str | None:
    try:
        out = subprocess.run(["relion_refine", "--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def add_ratios(r: dict) -> None:
    """Issue 5's two ratios per interpolation, into the result: RELION's seconds per iteration over ours, and our
    median error after the iterations over RELION's after as many (when RELION ran)."""
    rel = r["relion"]
    if not rel:
        return
    it3 = rel["score_it"][max(rel["score_it"], key=int)]
    for o in r["ours"].values():
        o["speedup_vs_relion"] = rel["mean_s_first"] / o["mean_s"]
        o["error_ratio_vs_relion_it3"] = o["score"]["angle_deg"]["median"] / it3["angle_deg"]["median"]


def table(r: dict) -> list[str]:
    """The comparison as Markdown lines (also the suite's report): one row per program, then the ratios."""
    rel = r["relion"]
    out = ["| program | s / iteration | angle error (deg) | shift error (px) | converged (deg) |",
           "| --- | --: | --: | --: | --: |"]
    for interp, o in r["ours"].items():
        out.append(f"| gpu-ali3d, {interp} | {o['mean_s']:.1f} | {o['score']['angle_deg']['median']:.3f} | "
                   f"{o['score']['shift_px']['median']:.3f} | |")
    if not rel:
        return out + ["", "RELION was not run."]
    it3 = rel["score_it"][max(rel["score_it"], key=int)]
    out += [f"| RELION 3.1 local auto-refine | {rel['mean_s_first']:.1f} | {it3['angle_deg']['median']:.3f} | "
            f"{it3['shift_px']['median']:.3f} | {rel['score_converged']['angle_deg']['median']:.3f} "
            f"({rel['iterations_to_converge']} iterations) |", ""]
    for interp, o in r["ours"].items():
        speed, acc = o["speedup_vs_relion"], o["error_ratio_vs_relion_it3"]
        out.append(f"- {interp}: {speed:.1f}x RELION's speed per iteration, {acc:.2f}x its error after "
                   f"{r['iterations']} iterations (issue 5 targets: >= 5x, <= 0.85x): "
                   f"{'both met' if speed >= 5 and acc <= 0.85 else 'NOT met'}.")
    return out


if __name__ == "__main__":
    sys.exit(main())
