"""A make_dataset.py folder with its particles moved by random sub-pixel amounts, so the true shifts are not 0.

make_dataset.py (../shared/tools) projects every particle at shift 0 and perturbs only the starting shifts. A
search whose translations lie on a grid through the old offset's whole pixels (RELION's) can then land exactly on
the truth, which a continuous search (our simplex) never does: the median shift error of such a set measures the
grid as much as the estimate. This script writes a copy of a dataset in which each image is translated by its own
(tx, ty), uniform in [-1, 1) pixels per axis (Fourier shift of the noisy image: signal and white noise move
together), with truth.star and start.star carrying the matching origins (gpu-ali3d's (sx, sy) = (-tx, -ty), the
same numbers as RELION's rlnOriginX/Y in pixels: geometry.py), so the starting errors are those of the original.

Run (from the repository root)::

    python bench/subpixel_dataset.py bench/runs/ribo_2000 bench/runs/ribo_2000_subpx --seed 7
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import starfile

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import derived_dataset  # noqa: E402


def main(argv=None) -> int:
    ap = derived_dataset.parser(__doc__.split("\n\n")[0], seed=7)
    ap.add_argument("--max-shift", type=float, default=1.0, help="|tx|, |ty| < this, pixels")
    a = ap.parse_args(argv)
    images = derived_dataset.read_images(a.dataset)
    n, m, _ = images.shape
    t = np.random.default_rng(a.seed).uniform(-a.max_shift, a.max_shift, (n, 2))      # (tx, ty) pixels
    k = np.fft.fftfreq(m)
    phase = np.exp(-2j * np.pi * (k[None, None, :] * t[:, 0, None, None] + k[None, :, None] * t[:, 1, None, None]))
    derived_dataset.write_images(a.dataset, a.out, np.fft.ifft2(np.fft.fft2(images) * phase).real)
    for name in ("start.star", "truth.star"):
        blocks = starfile.read(a.dataset / name, always_dict=True)
        table = blocks["particles"]
        apix = float(blocks["optics"]["rlnImagePixelSize"].iloc[0])
        index = table["rlnImageName"].str.split("@").str[0].astype(int).to_numpy() - 1
        table["rlnOriginXAngst"] = table["rlnOriginXAngst"] - t[index, 0] * apix
        table["rlnOriginYAngst"] = table["rlnOriginYAngst"] - t[index, 1] * apix
        starfile.write(blocks, a.out / name, overwrite=True)
    derived_dataset.copy_files(a.dataset, a.out, ("ref.mrc", "ref_scaled.mrc"))
    derived_dataset.write_meta(a.dataset, a.out, subpixel_of=str(a.dataset), subpixel_seed=a.seed,
                               subpixel_max_shift=a.max_shift)
    print(f"wrote {a.out}: {n} images moved by up to {a.max_shift:g} px per axis")
    return 0

if __name__ == "__main__":
    sys.exit(main())
