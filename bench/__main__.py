"""The benchmark suite in one command: ``python -m bench`` (from the repository root, in the project's environment).

Runs the benchmarks below one after another, each in its own process (so one machine, one run, ratios side by
side), collects their JSON and writes ``bench/results/suite_<host>.json`` and ``bench/results/suite_<host>.md``
(the Markdown tables the README quotes), with the machine and the versions:

* ``score``: objective evaluations (and samples) per second of the compiled kernel against the numpy reference,
  per interpolation and thread count, and on a GPU when one is present, beside an H100 roofline bound
  (bench_score.py);
* ``scaling``: ``gpu-ali3d refine`` seconds per iteration for 500 to 4,000 particles at box 64 and 128, with
  peak memory (bench_scaling.py);
* ``relion``: accuracy on RELION-simulated particles and the peer comparison with RELION 3.1's local
  auto-refine when RELION is installed (bench_relion.py; needs ``../shared``);
* ``mpi``: strong scaling under mpiexec and the communication model (bench_mpi.py; needs mpi4py);
* ``gpu_model``: the predicted GPU time per iteration from the strict stand-in's counts, beside the measured CPU
  time, extrapolated to 100,000 particles (bench_gpu_model.py).

A section that cannot run here (no RELION, no mpi4py) is skipped with its reason in the report.
``--quick`` runs small versions (about 5 minutes instead of about 20 on 2 cores). Running some ``--sections``
updates those in the host's report and keeps the others, each with the date it was measured.

    python -m bench                       # everything
    python -m bench --quick
    python -m bench --sections score scaling
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

HERE = Path(__file__).resolve().parent
SECTIONS = ("score", "scaling", "relion", "mpi", "gpu_model")

FULL = {"score": [], "scaling": [], "relion": [], "mpi": ["--n", "2000", "--box", "64"], "gpu_model": []}
QUICK = {"score": ["--boxes", "64", "--min-seconds", "1"], "scaling": ["--n", "500", "1000", "--boxes", "64"],
         "relion": ["--n", "500", "--interpolation", "trilinear"], "mpi": ["--n", "150", "--box", "48"],
         "gpu_model": ["--boxes", "64"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    ap.add_argument("--host", default=os.environ.get("BENCH_HOST") or socket.gethostname().split(".")[0] or "local",
                    help="name in the output files (default $BENCH_HOST or the host name)")
    a = ap.parse_args(argv)
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    args = QUICK if a.quick else FULL
    suite = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": a.host, "quick": a.quick, "sections": {}}
    previous = results_dir / f"suite_{a.host}.json"
    if previous.is_file() and set(a.sections) != set(SECTIONS):
        # a partial run updates its sections in the host's report and keeps the others (each has its date)
        old = json.loads(previous.read_text())
        if old.get("quick") == a.quick:
            suite["sections"] = {k: {"date": old["date"], **v} for k, v in old["sections"].items()
                                 if k not in a.sections}
    for name in a.sections:
        reason = _unavailable(name)
        if reason:
            print(f"== {name}: skipped ({reason})", flush=True)
            suite["sections"][name] = {"skipped": reason}
            continue
        out = results_dir / f"{name}_{a.host}.json"
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), *args[name], "--out", str(out)]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not out.is_file():
            suite["sections"][name] = {"failed": f"exit status {proc.returncode}"}
            print(f"== {name}: FAILED (exit status {proc.returncode})", flush=True)
            continue
        suite["sections"][name] = {"wall_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                   "result": json.loads(out.read_text())}
    from bench_score import machine_info

    suite["machine"] = machine_info()
    suite["versions"] = _versions()
    (results_dir / f"suite_{a.host}.json").write_text(json.dumps(suite, indent=1))
    md = markdown(suite)
    (results_dir / f"suite_{a.host}.md").write_text(md)
    print("\n" + md)
    print(f"wrote {results_dir / f'suite_{a.host}.json'} and .md")
    return 0 if not any("failed" in s for s in suite["sections"].values()) else 1


def _unavailable(name: str) -> str | None:
    if name == "relion" and not (HERE.parent.parent / "shared" / "tools" / "make_dataset.py").is_file():
        return "needs ../shared (tools and data) beside the repository"
    if name == "relion" and not shutil.which("relion_project"):
        return "RELION is not installed (apt-get install relion openmpi-bin)"
    if name == "mpi":
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            return "mpi4py is not installed (pip install -e '.[mpi]' mpich)"
        if not (shutil.which("mpiexec") or (Path(sys.executable).parent / "mpiexec").exists()):
            return "no mpiexec on PATH"
    return None


def _versions() -> dict:
    import numpy

    out = {"python": sys.version.split()[0], "numpy": numpy.__version__}
    for mod in ("scipy", "finufft", "cupy", "mpi4py", "gpu_ali3d"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "installed")
        except ImportError:
            out[mod] = None
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                    text=True).stdout.strip() or None
    except OSError:
        out["git"] = None
    return out


def markdown(suite: dict) -> str:
    """The report: machine, then one table per section (or why it was skipped)."""
    m, v = suite.get("machine", {}), suite.get("versions", {})
    lines = [f"# gpu-ali3d benchmark suite: {suite['host']}, {suite['date']}" + (" (quick)" if suite["quick"] else ""),
             "", f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('system')}; python {v.get('python')}, numpy "
             f"{v.get('numpy')}, scipy {v.get('scipy')}, finufft {v.get('finufft')}, cupy {v.get('cupy')}, "
             f"{m.get('compiler')}; gpu-ali3d {v.get('gpu_ali3d')} (git {v.get('git')})", ""]
    for name in [n for n in SECTIONS if n in suite["sections"]]:
        sec = suite["sections"][name]
        lines.append(f"## {name}")
        lines.append("")
        if "result" not in sec:
            lines += [f"{'Skipped' if 'skipped' in sec else 'Failed'}: {sec.get('skipped') or sec.get('failed')}", ""]
            continue
        lines += globals()[f"_md_{name}"](sec["result"]) + ["", f"({sec.get('date', suite['date'])}, "
                                                               f"{sec['wall_s']:.0f} s)", ""]
    return "\n".join(lines)


def _md_score(r: dict) -> list[str]:
    out = ["Objective evaluations per second (one evaluation: one image against one pose, all kept samples).", "",
           "| box | interpolation | threads | samples | numpy reference /s | kernel /s | kernel samples/s | "
           "GPU /s | H100 bound /s | GPU fraction of bound |", "| --: | --- | --: | --: | --: | --: | --: | --: | --: | --: |"]
    for x in r["rows"]:
        gpu = x.get("gpu_evals_per_s")
        frac = x.get("gpu_fraction_of_h100_bound")
        out.append(f"| {x['box']} | {x['interpolation']} | {x['threads']} | {x['samples']} | "
                   f"{x['reference_evals_per_s']:.1f} | {x['kernel_evals_per_s']:.0f} | "
                   f"{x.get('samples_per_s', x['kernel_evals_per_s'] * x['samples']):.3g} | "
                   f"{f'{gpu:.3g}' if gpu else '-'} | {x['roofline_h100']['bound_evals_per_s']:.3g} | "
                   f"{f'{frac:.2f}' if frac else '-'} |")
    return out


def _md_scaling(r: dict) -> list[str]:
    import bench_scaling

    return [f"`gpu-ali3d refine --CTF --maxit 2` ({r['rows'][0]['interpolation'] if r['rows'] else ''}), mean of "
            f"the alignment iterations; data simulated from {Path(r['map']).name}.", "",
            bench_scaling.header()] + [bench_scaling.row_line(x) for x in r["rows"]]


def _md_relion(r: dict) -> list[str]:
    import bench_relion

    s0 = r["start"]
    if "speedup_vs_relion" not in next(iter(r["ours"].values()), {}):
        bench_relion.add_ratios(r)
    return [f"RELION-simulated 70S ribosome particles ({Path(r['dataset']).name}), start "
            f"{s0['angle_deg']['median']:.2f} deg / {s0['shift_px']['median']:.2f} px; median errors from "
            f"shared/tools/score.py (gauge removed), after {r['iterations']} iterations.", ""] + bench_relion.table(r)


def _md_gpu_model(r: dict) -> list[str]:
    import bench_gpu_model

    g = r["gpu"]
    return [f"Predicted GPU seconds per iteration ({g['name']}, {g['hbm'] / 1e12:.2f} TB/s; launch "
            f"{r['model']['launch_s'] * 1e6:.0f} us, sync {r['model']['sync_s'] * 1e6:.0f} us, PCIe "
            f"{r['model']['pcie_bytes_per_s'] / 1e9:.0f} GB/s) from the stand-in's counts of "
            f"`refine --CTF` ({r['interpolation']}), first iteration; measured sizes and the fit's "
            f"{r['target_n']:,} particles.", "", bench_gpu_model.table(r["rows"] + r["targets"])]


def _md_mpi(r: dict) -> list[str]:
    out = [f"Strong scaling: {r['args']['n']} particles, box {r['args']['box']}, `refine --maxit 1 --CTF` "
           "(trilinear).", "", "| ranks | threads | wall s | speedup | max pose difference |",
           "| --: | --: | --: | --: | --: |"]
    for x in r["strong_scaling"]:
        out.append(f"| {x['ranks']} | {x['threads']} | {x['wall_s']:.1f} | {x['speedup_vs_1x1']:.2f} | "
                   f"{x['max_pose_diff']:.3g} |")
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
