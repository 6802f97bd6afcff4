"""The adaptive mask (--automask) and the objective's band level, side by side on a RELION-simulated dataset.

Run (from the repository root; the dataset is a make_dataset.py folder)::

    python bench/bench_automask.py bench/runs/gpcr_1000 --maxit 5 --variants 0:0.1 0.1:0.1 0.1:0.2 0.1:0.3 0.1:0.45

Each variant AUTOMASK:LEVEL is one ``local_ali3d(start.star, --CTF, --maxit N, --automask AUTOMASK)`` with
``alignment.BAND_LEVEL`` = LEVEL, in this process one after the other (the first, 0:0.1, is the run before the
adaptive mask: SPARX's sphere and the old band level). Prints seconds per iteration (alignment iterations only,
and their ratio to the first variant's), the band of the last alignment (Fourier pixels of the box), the FSC 0.143
resolution of the last map (half maps, under that run's mask) and the median angle and shift errors of the final
poses from ``../shared/tools/score.py`` (gauge removed), with the map's FSC against the true map (``--map``).
JSON to ``bench/results/automask_<dataset>_<host>.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT.parent / "shared" / "tools"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", type=Path, help="a make_dataset.py folder (start.star, truth.star, ref.mrc)")
    ap.add_argument("--maxit", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["0:0.1", "0.1:0.1", "0.1:0.2", "0.1:0.3", "0.1:0.45"],
                    help="AUTOMASK:BAND_LEVEL pairs; the first is the baseline of the time ratios")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from gpu_ali3d import alignment, refine

    rows = []
    print("| automask | band level | s / iteration | ratio | band (Fourier px) | FSC 0.143 (A) | angle (deg) | "
          "shift (px) | map FSC 0.143 vs truth (A) |")
    print("| --: | --: | --: | --: | --: | --: | --: | --: | --: |")
    for spec in a.variants:
        automask, level = (float(x) for x in spec.split(":"))
        alignment.BAND_LEVEL = level
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            result = refine.local_ali3d(str(a.dataset / "start.star"), out, CTF=True, maxit=a.maxit,
                                        automask=automask, progress=False)
            score = _score(a.dataset, out)
        recs = [r for r in result.records if r.align_s is not None]
        row = {"automask": automask, "band_level": level,
               "seconds_per_iteration": sum(r.wall_s for r in recs) / len(recs),
               "align_s": [r.align_s for r in recs], "band_px": recs[-1].kmax_px / 2,
               "fsc0143_A": result.records[-1].fsc0143_A, "score": score}
        row["ratio"] = row["seconds_per_iteration"] / (rows[0] if rows else row)["seconds_per_iteration"]
        rows.append(row)
        r = score["result"]
        print(f"| {automask:g} | {level:g} | {row['seconds_per_iteration']:.2f} | {row['ratio']:.2f} | "
              f"{row['band_px']:.1f} | {row['fsc0143_A']:.2f} | {r['angle_deg']['median']:.3f} | "
              f"{r['shift_px']['median']:.3f} | {_map_resolution(score):s} |", flush=True)
    host = os.environ.get("BENCH_HOST") or socket.gethostname()
    out = a.out or ROOT / "bench" / "results" / f"automask_{a.dataset.name}_{host}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "dataset": _shown(a.dataset),
                               "maxit": a.maxit, "rows": rows}, indent=1))
    print(f"wrote {_shown(out)}")
    return 0


def _score(dataset: Path, outdir: Path, *, with_map: bool = True) -> dict:
    """score.py's JSON for the final poses, with (with_map) the final map against the dataset's true map."""
    extra = ["--map", str(outdir / "map.mrc")] if with_map else []
    proc = subprocess.run([sys.executable, str(TOOLS / "score.py"), str(dataset), str(outdir / "particles.star"),
                           *extra], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _map_resolution(score: dict) -> str:
    value = (score.get("map") or {}).get("fsc0143_A")
    return "-" if value is None else f"{value:.2f}"


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
