"""A make_dataset.py folder with coloured noise added to its particles: the noise of real micrographs is not white.

make_dataset.py (../shared/tools) adds white noise (RELION's ``--white_noise``), on which whitening the objective
can change nothing. Real noise falls with frequency (the detector's MTF, ice, the dose). This script writes a
copy of a dataset in which every image gets, on top of its white noise (unit variance after make_dataset's
normalisation), stationary Gaussian noise of power spectrum

    P(k) = amplitude / (1 + (k / k0)^2)        (k in cycles per pixel; per Fourier sample, relative to the white
                                                noise's 1)

so the noise power falls from 1 + amplitude at k = 0 to about 1 + amplitude (k0 / 0.5)^2 at Nyquist. Its own
random stream (``--seed``) for each image; poses, CTFs and the true map are those of the original.

Run (from the repository root)::

    python bench/coloured_noise_dataset.py bench/runs/ribo_2000 bench/runs/ribo_2000_coloured --seed 11
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import derived_dataset  # noqa: E402


def coloured_noise(rng: np.random.Generator, n: int, m: int, amplitude: float, k0: float) -> np.ndarray:
    """n real (m, m) images of stationary noise with power amplitude / (1 + (k / k0)^2) per Fourier sample
    (unnormalised DFT power divided by m^2: white noise of unit variance has 1 at every k), float64."""
    ky, kx = np.meshgrid(np.fft.fftfreq(m), np.fft.fftfreq(m), indexing="ij")
    amplitude_k = np.sqrt(amplitude / (1.0 + (kx ** 2 + ky ** 2) / k0 ** 2))
    white = rng.standard_normal((n, m, m))
    return np.fft.ifft2(np.fft.fft2(white) * amplitude_k).real


def main(argv=None) -> int:
    ap = derived_dataset.parser(__doc__.split("\n\n")[0], seed=11)
    ap.add_argument("--amplitude", type=float, default=9.0, help="extra noise power at k = 0 (white noise: 1)")
    ap.add_argument("--k0", type=float, default=0.1, help="where the extra power halves, cycles per pixel")
    a = ap.parse_args(argv)
    images = derived_dataset.read_images(a.dataset)
    n, m, _ = images.shape
    rng = np.random.default_rng(a.seed)
    noisy = np.empty(images.shape, dtype=np.float32)
    for start in range(0, n, 500):                   # 500 images at a time: a few hundred MB at box 128
        stop = min(start + 500, n)
        noisy[start:stop] = images[start:stop] + coloured_noise(rng, stop - start, m, a.amplitude, a.k0)
    derived_dataset.write_images(a.dataset, a.out, noisy)
    derived_dataset.copy_files(a.dataset, a.out, ("start.star", "truth.star", "sim.star", "ref.mrc", "ref_scaled.mrc"))
    derived_dataset.write_meta(a.dataset, a.out, coloured_of=str(a.dataset), coloured_seed=a.seed,
                               coloured_amplitude=a.amplitude, coloured_k0=a.k0)
    print(f"wrote {a.out}: {n} images with coloured noise (extra power {a.amplitude:g} / (1 + (k / {a.k0:g})^2))")
    return 0

if __name__ == "__main__":
    sys.exit(main())
