"""The objective's band limit: accuracy and alignment time against alignment.BAND_LEVEL (where it cuts the
reference's tanh filter), on a RELION-simulated dataset.

Run (from the repository root; the dataset is a make_dataset.py folder, e.g. the one bench_relion.py made)::

    python bench/bench_band.py bench/runs/relion_2000/dataset --levels 0.01 0.05 0.1 0.2

For each level: ``local_ali3d(start.star, --CTF, --maxit 2, trilinear)`` with ``alignment.BAND_LEVEL`` set to it, in
this process one after the other; prints the band (Fourier pixels of the box) and alignment seconds of each of the
two iterations, and the median angle and shift error after them against ``truth.star`` (gauge removed,
:func:`gpu_ali3d.accuracy.pose_errors`). JSON to ``bench/results/band_<host>.json`` (``--out``).
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

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", type=Path, help="a make_dataset.py folder (start.star, truth.star)")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from gpu_ali3d import alignment, refine
    from gpu_ali3d.accuracy import pose_errors
    from gpu_ali3d.io.formats import read_stack

    truth = read_stack(a.dataset / "truth.star").poses
    rows = []
    print("| level | band it. 1, 2 (Fourier px) | alignment s it. 1, 2 | angle error (deg) | shift error (px) |")
    print("| --: | --: | --: | --: | --: |")
    for level in a.levels:
        alignment.BAND_LEVEL = level
        with tempfile.TemporaryDirectory() as tmp:
            result = refine.local_ali3d(str(a.dataset / "start.star"), Path(tmp) / "out", CTF=True, maxit=2,
                                        interpolation="trilinear", progress=False)
        recs = [r for r in result.records if r.align_s is not None]
        err = pose_errors(result.poses, truth)
        row = {"level": level, "band_px": [r.kmax_px / 2 for r in recs], "align_s": [r.align_s for r in recs], **err}
        rows.append(row)
        print(f"| {level:g} | {row['band_px'][0]:.1f}, {row['band_px'][1]:.1f} | {row['align_s'][0]:.1f}, "
              f"{row['align_s'][1]:.1f} | {err['angle_deg']:.3f} | {err['shift_px']:.3f} |", flush=True)
    out = a.out or ROOT / "bench" / "results" / f"band_{os.environ.get('BENCH_HOST') or socket.gethostname()}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
