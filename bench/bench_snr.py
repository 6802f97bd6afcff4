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

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.side_by_side import command  # noqa: E402


def main(argv=None) -> int:
    from gpu_ali3d.cli import _snr_value

    return command(argv, __doc__.split("\n\n")[0], "snr", ["measured", "1", "1000", "auto"], _snr_value, "snr")


if __name__ == "__main__":
    sys.exit(main())
