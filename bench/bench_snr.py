"""The reconstruction's Wiener constant (--snr measured / a number / auto), side by side on simulated datasets.

Run (from the repository root; each dataset is a folder with start.star, truth.star, meta.json: make_dataset.py's,
or ../shared/data/relion_sim/clean and noisy)::

    python bench/bench_snr.py ../shared/data/relion_sim/clean:10 ../shared/data/relion_sim/noisy:10 \\
        bench/runs/ribo_2000:3 bench/runs/gpcr_1000:5 --variants measured 1 1000 auto

Each DATASET:MAXIT and variant is one ``local_ali3d(start.star, --CTF, --maxit MAXIT, --snr VARIANT)`` with the
other options at their defaults, in this process one after the other. Prints seconds per iteration (alignment
iterations only), the SNR each run's last reconstruction used (``auto``: per-shell terms), the last alignment's
mean score, and the median angle and shift errors of the final poses from ``../shared/tools/score.py`` (gauge
removed), with the final map's FSC 0.143 against the true map where the dataset has one (``ref.mrc``).
JSON to ``bench/results/snr_<host>.json`` (``--out``).
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

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_automask import ROOT, _map_resolution, _score, _shown  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="+", help="DATASET:MAXIT, DATASET a folder with start.star and truth.star")
    ap.add_argument("--variants", nargs="+", default=["measured", "1", "1000", "auto"],
                    help="--snr values: measured, a number, auto")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from gpu_ali3d import refine
    from gpu_ali3d.cli import _snr_value

    rows = []
    print("| dataset | iterations | --snr | s / iteration | last snr | score | angle (deg) | shift (px) | "
          "map FSC 0.143 vs truth (A) |")
    print("| --- | --: | --- | --: | --: | --: | --: | --: | --: |")
    for spec in a.datasets:
        folder, _, maxit = spec.rpartition(":")
        dataset, maxit = Path(folder), int(maxit)
        for variant in a.variants:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                result = refine.local_ali3d(str(dataset / "start.star"), out, CTF=True, maxit=maxit,
                                            snr=_snr_value(variant), progress=False)
                score = _score(dataset, out, with_map=(dataset / "ref.mrc").is_file())
            recs = [r for r in result.records if r.align_s is not None]
            row = {"dataset": _shown(dataset), "maxit": maxit, "snr": variant,
                   "seconds_per_iteration": sum(r.wall_s for r in recs) / len(recs),
                   "snr_used": [r.snr for r in result.records], "score_after": recs[-1].criterion_after,
                   "score": score}
            rows.append(row)
            r, last = score["result"], row["snr_used"][-1]
            print(f"| {dataset.name} | {maxit} | {variant} | {row['seconds_per_iteration']:.2f} | "
                  f"{'auto' if last is None else f'{last:.3g}'} | {row['score_after']:.4f} | "
                  f"{r['angle_deg']['median']:.3f} | {r['shift_px']['median']:.3f} | {_map_resolution(score)} |",
                  flush=True)
    host = os.environ.get("BENCH_HOST") or socket.gethostname()
    out = a.out or ROOT / "bench" / "results" / f"snr_{host}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, indent=1))
    print(f"wrote {_shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
