"""One refinement option's values side by side on simulated datasets: the loop of bench_snr.py and
bench_objective.py.

Each DATASET:MAXIT and value is one ``local_ali3d(start.star, --CTF, --maxit MAXIT, OPTION=value)`` with the other
options at their defaults, in this process one after the other (the values of one dataset back to back, so their
seconds compare on a shared machine). Prints seconds per iteration (alignment iterations only), the SNR of the last
reconstruction's Wiener constant (``auto``: per-shell terms), the last alignment's mean score, the median angle and
shift errors of the final poses from ``../shared/tools/score.py`` (gauge removed) and, where the dataset has its
true map (``ref.mrc``), the final map's FSC 0.143 against it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_automask import ROOT, _map_resolution, _score, _shown  # noqa: E402


def side_by_side(specs: list[str], option: str, values: list[str], convert: Callable[[str], object],
                 out: Path | None, stem: str) -> list[dict]:
    """Run every DATASET:MAXIT of ``specs`` with ``option`` = convert(value) for each of ``values``; print the
    table, write JSON to ``out`` (default bench/results/<stem>_<host>.json) and return its rows."""
    from gpu_ali3d import refine

    rows = []
    print(f"| dataset | iterations | --{option.replace('_', '-')} | s / iteration | last snr | score | angle (deg) | "
          "shift (px) | map FSC 0.143 vs truth (A) |")
    print("| --- | --: | --- | --: | --: | --: | --: | --: | --: |")
    for spec in specs:
        folder, _, maxit = spec.rpartition(":")
        dataset, maxit = Path(folder), int(maxit)
        for value in values:
            with tempfile.TemporaryDirectory() as tmp:
                outdir = Path(tmp) / "out"
                result = refine.local_ali3d(str(dataset / "start.star"), outdir, CTF=True, maxit=maxit,
                                            progress=False, **{option: convert(value)})
                score = _score(dataset, outdir, with_map=(dataset / "ref.mrc").is_file())
            recs = [r for r in result.records if r.align_s is not None]
            row = {"dataset": _shown(dataset), "maxit": maxit, option: value,
                   "seconds_per_iteration": sum(r.wall_s for r in recs) / len(recs),
                   "snr_used": [r.snr for r in result.records], "score_after": recs[-1].criterion_after,
                   "score": score}
            rows.append(row)
            r, last = score["result"], row["snr_used"][-1]
            print(f"| {dataset.name} | {maxit} | {value} | {row['seconds_per_iteration']:.2f} | "
                  f"{'auto' if last is None else f'{last:.3g}'} | {row['score_after']:.4f} | "
                  f"{r['angle_deg']['median']:.3f} | {r['shift_px']['median']:.3f} | {_map_resolution(score)} |",
                  flush=True)
    host = os.environ.get("BENCH_HOST") or socket.gethostname()
    out = out or ROOT / "bench" / "results" / f"{stem}_{host}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "option": option, "rows": rows},
                              indent=1))
    print(f"wrote {_shown(out)}")
    return rows


def command(argv, description: str, option: str, defaults: list[str], convert: Callable[[str], object],
            stem: str) -> int:
    """The command line of a side-by-side script: DATASET:MAXIT ..., --variants (values of ``option``, default
    ``defaults``), --out; runs :func:`side_by_side`."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("datasets", nargs="+", help="DATASET:MAXIT, DATASET a folder with start.star and truth.star")
    ap.add_argument("--variants", nargs="+", default=defaults, help=f"--{option.replace('_', '-')} values")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    side_by_side(a.datasets, option, a.variants, convert, a.out, stem)
    return 0
