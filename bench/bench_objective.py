"""The alignment's objective (--objective plain / whitened), side by side on simulated datasets.

Run (from the repository root; each dataset a folder with start.star, truth.star, meta.json: make_dataset.py's,
bench/coloured_noise_dataset.py's copies of them with the noise of micrographs, or ../shared/data/relion_sim)::

    python bench/bench_objective.py ../shared/data/relion_sim/clean:10 ../shared/data/relion_sim/noisy:10 \\
        bench/runs/ribo_2000:3 bench/runs/gpcr_1000:5 bench/runs/ribo_2000_coloured:3 bench/runs/gpcr_1000_coloured:5

Each DATASET:MAXIT and objective is one ``local_ali3d(start.star, --CTF, --maxit MAXIT, --objective OBJECTIVE)``
with the other options at their defaults (bench/side_by_side.py: the table's columns). JSON to
``bench/results/objective_<host>.json`` (``--out``).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.side_by_side import command  # noqa: E402


def main(argv=None) -> int:
    return command(argv, __doc__.split("\n\n")[0], "objective", ["plain", "whitened"], str, "objective")


if __name__ == "__main__":
    sys.exit(main())
