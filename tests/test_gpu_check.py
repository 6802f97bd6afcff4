"""bench/gpu_check.py (the check for the day a GPU is lent) and bench/bench_gpu_model.py (the predicted GPU time),
as far as they run without a GPU: the check refuses at once, in one line, with its own exit status; its argument
parsing; its alignment-throughput and model parts on the strict stand-in; the model's fit and extrapolation."""
from __future__ import annotations

import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "bench"))
import bench_gpu_model  # noqa: E402
import gpu_check  # noqa: E402


def test_without_a_gpu_the_check_stops_at_once_with_one_line(tmp_path):
    out = tmp_path / "check.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(PROJECT / "bench" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=PROJECT)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == gpu_check.NO_GPU, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no usable CUDA device: "), proc.stderr
    assert "nothing was run" in lines[0]
    assert proc.stdout == "" and not out.exists()
    assert elapsed < 60


def test_argument_parsing():
    a = gpu_check.parse_args([])
    assert (a.skip, a.device, a.n, a.box, a.out) == ([], 0, 500, 64, None)
    a = gpu_check.parse_args(["--skip", "tests", "model", "--device", "1", "--n", "100"])
    assert a.skip == ["tests", "model"] and a.device == 1 and a.n == 100
    for bad in (["--skip", "everything"], ["--n", "5"], ["--device", "x"]):
        with pytest.raises(SystemExit) as err:
            gpu_check.parse_args(bad)
        assert err.value.code == 2


def test_gpu_problem_names_the_reason():
    problem = gpu_check.gpu_problem()
    if problem is None:
        pytest.skip("a CUDA device is usable here")
    assert "cupy" in problem and "\n" not in problem


def test_align_throughput_on_the_standin(standin_backend):
    row = gpu_check.align_throughput(standin_backend, 24, "trilinear", n=6, repeats=1)
    assert row["evaluations"] >= 6 * 7 and row["evals_per_s"] > 0 and row["samples"] > 100
    assert 0 < row["fraction_of_bound"] and row["h100_bound_evals_per_s"] > row["evals_per_s"]
    assert standin_backend.counts.mixing_errors == 0


def test_pose_difference():
    from gpu_ali3d.geometry import angular_distance, shift_distance

    a = np.zeros((4, 5))
    b = a.copy()
    b[:, 3] = [0.0, 0.0, 0.3, 0.4]
    d = gpu_check.pose_difference(a, b, angular_distance, shift_distance)
    assert d["median_angle_deg"] == 0.0 and d["max_shift_px"] == pytest.approx(0.4)


def test_model_part_on_the_standin(tmp_path):
    """The check's model part (a stand-in profile and bench_gpu_model.predict) on a tiny set, no GPU reading."""
    result = gpu_check.part_model(tmp_path, None, Namespace(n=30, box=24))
    pred = result["predicted"]
    assert result["ok"] and result["measured_s"] is None and result["model"] == "H100 SXM"
    assert set(pred["parts_s"]) == set(bench_gpu_model.PARTS)
    assert all(v >= 0 for v in pred["parts_s"].values()) and pred["total_s"] >= pred["gpu_only_s"] > 0
    assert result["counts"]["align_samples"] > 0 and result["counts"]["insert_contributions"] > 0


def _model_row(n, host_s=None):
    """One measured row of bench_gpu_model's counts at n particles, growing linearly with n."""
    return dict(box=64, n=n, batches=1, launches=179, syncs=8, h2d_copies=48, h2d_bytes=1000 + 100 * n,
                d2h_bytes=6e6, library_bytes=1e9 + 1e5 * n, fft2d_bytes=1e4 * n, fft3d_bytes=1e8,
                insert_contributions=1e5 * n, insert_plane_bytes=1e4 * n, unscale_voxels=128 * 128 * 65,
                host_s=0.2 + 1e-3 * n if host_s is None else host_s, evaluations=300 * n, align_samples=400,
                align_launches=1, align_syncs=1, align_h2d_copies=8)


def test_gpu_model_fit_and_extrapolation():
    """Two measured rows that grow linearly: the fit returns the line, the per-batch alignment counts are taken
    out and put back for the target's batches, and every part of the prediction is non-negative."""
    rows = [_model_row(100), _model_row(200)]
    fit = bench_gpu_model.fit_counts(rows)
    assert fit["h2d_bytes"]["b"] == pytest.approx(100) and fit["h2d_bytes"]["a"] == pytest.approx(1000)
    assert fit["launches"]["b"] == pytest.approx(0, abs=1e-9) and fit["launches"]["a"] == pytest.approx(178)
    target = bench_gpu_model.extrapolate(fit, rows, 64, 100_000, "trilinear", bench_gpu_model.GPUS["h100"])
    assert target["batches"] >= 1 and target["launches"] == pytest.approx(178 + target["batches"])
    assert target["evaluations"] == pytest.approx(300 * 100_000)
    assert target["align_samples"] == bench_gpu_model.full_band_samples(64) > 400
    pred = bench_gpu_model.predict(target, 64, "trilinear", bench_gpu_model.GPUS["h100"])
    assert all(v >= 0 for v in pred["parts_s"].values())
    assert pred["parts_s"]["host"] == pytest.approx(0.2 + 100.0)
    assert "| 64 | 100,000 | extrapolated |" in bench_gpu_model.table([{**target, "predicted": pred}])


def test_gpu_model_never_extrapolates_host_time_below_what_was_measured():
    """Host seconds that fell between the two timed runs (noise on a shared machine) keep the smaller measured
    value at the target size, instead of a line that goes through zero."""
    rows = [_model_row(100, host_s=0.30), _model_row(200, host_s=0.25)]
    fit = bench_gpu_model.fit_counts(rows)
    assert fit["host_s"]["b"] < 0
    target = bench_gpu_model.extrapolate(fit, rows, 64, 100_000, "trilinear", bench_gpu_model.GPUS["h100"])
    assert target["host_s"] == pytest.approx(0.25)
