"""How far a refinement's last alignment is from what its data allow: the same alignment against better references,
and with a posterior-mean pose in place of the simplex's optimum.

Run (from the repository root; DATASET a make_dataset.py folder with its true map ref.mrc, RUN a finished
``gpu-ali3d refine`` of it with at least 2 alignment iterations)::

    gpu-ali3d refine bench/runs/ribo_2000/start.star bench/runs/floor_70s --CTF --maxit 3
    python bench/bench_floor.py bench/runs/ribo_2000 bench/runs/floor_70s

The run's last alignment (iteration maxit - 1, from the poses that entered it, params_<maxit - 2>.txt, with the
run's options, noise spectrum, backend and band limit) is repeated against:

* the run's own reference (volf<maxit - 1>): the run's figure again. Not bit for bit: the saved reference is
  float32 and the saved start poses have 6 decimals, and a simplex path can turn on such a difference (the table
  gives the median and largest angle between these poses and the run's particles.star: 0.001 and 1.4 deg on the
  70S set);
* the true map, normalised and masked as ``ref_ali3d`` does (with the run's mask: the iteration's automask, made
  again from vol<maxit - 1>) and low-passed by the same tanh filter fitted to the run's FSC: the error a reference
  as good as the truth would give at the resolution the data reach;
* the true map to Nyquist, unfiltered: what a reference could give beyond that resolution.

And the run's reference once more, with each pose then replaced by the posterior mean of ``--samples`` poses drawn
around the simplex's optimum (rotations R exp([d]), d ~ N(0, (1.5 deg)^2 I3), and shifts ~ N(0, (0.3 px)^2 I2);
importance weights exp(beta (cc - cc_max)) / q): beta = n_eff cc_max / (1 - cc_max^2) is the data's own scale of
the log-likelihood |X|^2 cc^2 / (2 sigma^2) of a whitened image (noise sigma^2 = |X|^2 (1 - cc^2) / n_eff, n_eff the
band's samples times the mean square of the image mask), linearised at cc_max; the rotation mean is the normalised
weighted mean of sign-aligned quaternions. This is a measurement, not an option of refine.

Errors are score.py's medians, gauge removed (``../shared/tools/score.py``). JSON to
``bench/results/floor_<host>.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_automask import ROOT, _score, _shown  # noqa: E402

#: The proposal's spreads around the simplex's optimum: per rotation axis (degrees) and per shift axis (pixels).
PROPOSAL_DEG, PROPOSAL_PX = 1.5, 0.3
#: Images per block of the posterior's evaluations.
BLOCK = 250


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", type=Path, help="a make_dataset.py folder (start.star, truth.star, ref.mrc)")
    ap.add_argument("run", type=Path, help="a finished gpu-ali3d refine output directory of that dataset")
    ap.add_argument("--samples", type=int, default=300, help="poses per image for the posterior mean")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    rows = floor(a.dataset, a.run, samples=a.samples, seed=a.seed)
    host = os.environ.get("BENCH_HOST") or socket.gethostname()
    out = a.out or ROOT / "bench" / "results" / f"floor_{host}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "dataset": _shown(a.dataset),
                               "run": _shown(a.run), "rows": rows}, indent=1))
    print(f"wrote {_shown(out)}")
    return 0


def floor(dataset: Path, run: Path, *, samples: int, seed: int) -> list[dict]:
    """The table's rows (printed as they come): reference, band, pose estimate, score.py's result and seconds."""
    from gpu_ali3d import alignment, refine
    from gpu_ali3d.backend import make_backend
    from gpu_ali3d.geometry import angular_distance
    from gpu_ali3d.io.formats import read_stack, read_volume
    from gpu_ali3d.masking import adaptive_mask
    from gpu_ali3d.resolution import fit_tanh, sphere_mask
    from gpu_ali3d.user_functions import ref_ali3d

    opts = refine.job_options(json.loads((run / "job.json").read_text()))
    if opts.maxit < 2:
        raise SystemExit(f"{run}: maxit {opts.maxit}; this needs a run of at least 2 alignment iterations")
    it = opts.maxit - 1                                                  # the last alignment
    stack = read_stack(dataset / "start.star")
    images = stack.read_images()
    box, apix = stack.box, stack.apix_A
    ou = opts.outer_radius(box)
    ctf = stack.ctf if opts.CTF else None
    start = np.loadtxt(run / f"params_{it - 1:03d}.txt", ndmin=2)
    final = read_stack(run / "particles.star").poses
    spectrum = refine.noise_spectrum(stack, ou, opts)
    backend = None if opts.device == "reference" else make_backend(opts.device)
    curve = tuple(np.loadtxt(run / f"resolution{it:03d}_000", ndmin=2).T)
    cutoff, falloff = fit_tanh(curve)
    raw, _ = read_volume(run / f"vol{it:03d}_000.hdf")
    volf, _ = read_volume(run / f"volf{it:03d}_000.hdf")
    true, _ = read_volume(dataset / "ref.mrc")
    sphere = sphere_mask(box, ou)                                       # refine's mask without --mask
    mask = adaptive_mask(raw, apix, sphere, threshold=opts.automask) if opts.automask > 0 else sphere
    true_filtered = ref_ali3d([mask, 0, true, curve])[0]
    background = true[~(mask > 0.5)]
    true_normalised = (true - background.mean()) / background.std(ddof=1) * mask

    def align(reference, band):
        c, f = band
        new, _, _, kmax, _ = alignment.align_poses(images, start, reference, ctf, apix, ou, opts, c, f, backend,
                                                   False, "", noise_spectrum=spectrum)
        return new, kmax

    print("| reference | band (cycles/px) | pose | angle (deg) | shift (px) | seconds |")
    print("| --- | --: | --- | --: | --: | --: |")
    rows = []

    def row(reference, kmax, pose, poses, seconds):
        result = _scored(dataset, stack, poses)["result"]
        rows.append({"reference": reference, "band": kmax / (2 * box), "pose": pose, "result": result,
                     "seconds": seconds})
        print(f"| {reference} | {kmax / (2 * box):.3f} | {pose} | {result['angle_deg']['median']:.3f} | "
              f"{result['shift_px']['median']:.3f} | {seconds:.1f} |", flush=True)

    t0 = time.perf_counter()
    own, kmax = align(volf, (cutoff, falloff))
    seconds = time.perf_counter() - t0
    turned = angular_distance(own, final)
    row(f"the run's (volf{it:03d}; {np.median(turned):.3f} / {turned.max():.2f} deg from its particles.star)", kmax,
        "simplex", own, seconds)
    for name, reference, band in (("true map, the run's mask and tanh filter", true_filtered, (cutoff, falloff)),
                                  ("true map, to Nyquist", true_normalised, (0.5, 0.0))):
        t0 = time.perf_counter()
        poses, k = align(reference, band)
        row(name, k, "simplex", poses, time.perf_counter() - t0)
    t0 = time.perf_counter()
    mean = posterior_mean(images, own, volf, ctf, apix, ou, opts, kmax, spectrum, backend, samples=samples,
                          rng=np.random.default_rng(seed))
    row(f"the run's (volf{it:03d})", kmax, f"posterior mean of {samples}", mean, seconds + time.perf_counter() - t0)
    return rows


def posterior_mean(images, poses, volf, ctf, apix, ou, opts, kmax, spectrum, backend, *, samples: int,
                   rng) -> np.ndarray:
    """Each pose replaced by the posterior mean of ``samples`` poses around it (module docstring); float64 (n, 5)."""
    from scipy.spatial.transform import Rotation

    from gpu_ali3d.alignment import IMAGE_PAD
    from gpu_ali3d.geometry import euler_from_matrix, rotation_matrix
    from gpu_ali3d.gridding import prepare_reference
    from gpu_ali3d.score import MASK_EDGE_PX, make_objective, prepare_images, soft_mask

    ref = prepare_reference(volf, pad=2, interpolation=opts.interpolation)
    mask_power = float((soft_mask(images.shape[-1], ou, MASK_EDGE_PX) ** 2).mean())
    out = np.array(poses, dtype=np.float64)
    for first in range(0, len(poses), BLOCK):
        rows = np.arange(first, min(len(poses), first + BLOCK))
        b = len(rows)
        prep = prepare_images(images[rows], ou, ctf=None if ctf is None else ctf[rows], apix_A=apix, kmax=kmax,
                              image_pad=IMAGE_PAD, whiten=spectrum)
        objective = make_objective(ref, prep, backend=backend)
        turn = rng.normal(0.0, np.radians(PROPOSAL_DEG), (b, samples, 3))
        move = rng.normal(0.0, PROPOSAL_PX, (b, samples, 2))
        turn[:, 0], move[:, 0] = 0.0, 0.0                                  # the optimum itself is a sample
        rotations = (rotation_matrix(out[rows, 0], out[rows, 1], out[rows, 2])[:, None]
                     @ Rotation.from_rotvec(turn.reshape(-1, 3)).as_matrix().reshape(b, samples, 3, 3))
        drawn = np.empty((b, samples, 5))
        drawn[..., 0], drawn[..., 1], drawn[..., 2] = euler_from_matrix(rotations)
        drawn[..., 3:] = out[rows, None, 3:] + move
        quats = Rotation.from_matrix(rotations.reshape(-1, 3, 3)).as_quat().reshape(b, samples, 4)
        quats *= np.sign(np.einsum("bsq,bq->bs", quats, quats[:, 0]))[..., None]     # one hemisphere per image
        xp = np if backend is None else backend.xp
        cc = objective(xp.asarray(drawn.reshape(-1, 5)), xp.asarray(np.repeat(np.arange(b), samples)))
        cc = (cc if backend is None else backend.to_host(cc)).reshape(b, samples)
        log_q = -0.5 * ((turn ** 2).sum(-1) / np.radians(PROPOSAL_DEG) ** 2 + (move ** 2).sum(-1) / PROPOSAL_PX ** 2)
        best = cc.max(axis=1, keepdims=True)
        beta = prep.weights.sum() * mask_power * best / np.maximum(1.0 - best ** 2, 1e-12)
        log_w = beta * (cc - best) - log_q
        w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        q = (w[..., None] * quats).sum(axis=1)
        phi, theta, psi = euler_from_matrix(Rotation.from_quat(q / np.linalg.norm(q, axis=1, keepdims=True)).as_matrix())
        out[rows] = np.column_stack([phi, theta, psi, (w[..., None] * drawn[..., 3:]).sum(axis=1)])
    return out


def _scored(dataset: Path, stack, poses: np.ndarray) -> dict:
    """score.py's JSON for ``poses`` of ``stack`` (written as a particles.star in a temporary folder)."""
    from gpu_ali3d.io.formats import write_stack

    with tempfile.TemporaryDirectory() as tmp:
        write_stack(replace(stack, poses=poses), Path(tmp) / "particles.star")
        return _score(dataset, Path(tmp), with_map=False)


if __name__ == "__main__":
    sys.exit(main())
