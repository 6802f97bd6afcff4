"""What the scripts that derive a dataset from a make_dataset.py folder share (bench/coloured_noise_dataset.py,
bench/subpixel_dataset.py): their command line's first arguments, the images read and written (sim.mrcs, float32,
the source's pixel size), files copied unchanged, and meta.json with the derivation's own keys added."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import mrcfile
import numpy as np


def parser(description: str, seed: int) -> argparse.ArgumentParser:
    """The arguments every derivation takes: the source folder, the new one, and the random seed."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("dataset", type=Path, help="a make_dataset.py folder (sim.mrcs, start.star, truth.star)")
    ap.add_argument("out", type=Path, help="the new folder (must not exist)")
    ap.add_argument("--seed", type=int, default=seed)
    return ap


def read_images(dataset: Path) -> np.ndarray:
    """The folder's images, float64 (n, m, m)."""
    return mrcfile.read(dataset / "sim.mrcs").astype(np.float64)


def write_images(dataset: Path, out: Path, images: np.ndarray) -> None:
    """``images`` as out/sim.mrcs (float32), with the source stack's pixel size; out is created (must not exist)."""
    out.mkdir(parents=True)
    with mrcfile.new(out / "sim.mrcs") as f:
        f.set_data(np.asarray(images, dtype=np.float32))
        with mrcfile.open(dataset / "sim.mrcs", header_only=True) as src:
            f.voxel_size = src.voxel_size


def copy_files(dataset: Path, out: Path, names) -> None:
    """Copy the named files that exist in dataset to out, unchanged."""
    for name in names:
        if (dataset / name).is_file():
            shutil.copy(dataset / name, out / name)


def write_meta(dataset: Path, out: Path, **added) -> None:
    """out/meta.json: the source's meta.json with ``added`` keys."""
    meta = json.loads((dataset / "meta.json").read_text())
    meta.update(added)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
