"""--snr measured (the default): the reconstruction's Wiener constant from the last alignment's mean score."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gpu_ali3d import local_ali3d
from gpu_ali3d.accuracy import pose_errors
from gpu_ali3d.cli import _snr_value
from gpu_ali3d.io.formats import read_stack
from gpu_ali3d.options import SNR_MEASURED, RefineOptions
from gpu_ali3d.reconstruct import MEASURED_SNR_RANGE, snr_from_score
from gpu_ali3d.refine import IterationRecord, reconstruction_snr


def test_snr_from_the_score_inverts_cc_squared_within_its_range():
    low, high = MEASURED_SNR_RANGE
    for cc in (0.75, 0.9, 0.99):            # cc^2 = S / (S + N)
        snr = snr_from_score(cc)
        assert math.isclose(math.sqrt(snr / (1 + snr)), cc, rel_tol=1e-12)
    # below SNR 1 (cc < 1/sqrt(2)), or no alignment yet, or a meaningless score: SPARX's constant
    for cc in (None, 0.0, -0.2, 0.5, 1 / math.sqrt(2) - 1e-9, float("nan")):
        assert snr_from_score(cc) == low == 1.0
    assert snr_from_score(0.99999) == snr_from_score(1.0) == high       # capped: 1/snr stays above rounding
    assert snr_from_score(0.9) < snr_from_score(0.95) < snr_from_score(0.99)


def test_the_snr_of_each_reconstruction_comes_from_the_last_alignment():
    records = [IterationRecord(0, 0, criterion_before=0.5, criterion_after=0.9),
               IterationRecord(1, 0, criterion_before=0.9, criterion_after=0.95),
               IterationRecord(2, 0)]                                    # the final reconstruction: no score
    measured = RefineOptions()
    assert measured.snr == SNR_MEASURED
    assert reconstruction_snr(measured, []) == 1.0                       # the first map: SPARX's constant
    assert reconstruction_snr(measured, records[:1]) == snr_from_score(0.9)
    assert reconstruction_snr(measured, records) == snr_from_score(0.95)
    assert reconstruction_snr(RefineOptions(snr=3.0), records) == 3.0    # a number is SPARX's fixed constant
    assert reconstruction_snr(RefineOptions(snr=None), records) is None  # auto: per-shell terms


def test_the_option_accepts_measured_auto_and_numbers_only():
    assert _snr_value("measured") == SNR_MEASURED and _snr_value(" Auto ") is None and _snr_value("2.5") == 2.5
    with pytest.raises(ValueError):
        _snr_value("bogus")
    for bad in ("bogus", 0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="--snr"):
            RefineOptions(snr=bad)


def _refine(shared_data, tmp_path, name, maxit, **options):
    folder = shared_data / "relion_sim" / name
    result = local_ali3d(str(folder / "start.star"), tmp_path / f"{name}_{options.get('snr', 'default')}",
                         maxit=maxit, CTF=True, device="cpu", progress=False, **options)
    return result, pose_errors(result.poses, read_stack(folder / "truth.star").poses)


def test_clean_data_are_hardly_smoothed_and_align_better_than_with_sparx_constant(shared_data, tmp_path):
    """relion_sim/clean (200 particles, SNR 1000): the measured SNR rises above 1 from the first alignment on, and
    the poses end closer to the truth than with SPARX's fixed snr 1."""
    measured, err = _refine(shared_data, tmp_path, "clean", 4)
    fixed, err_fixed = _refine(shared_data, tmp_path, "clean", 4, snr=1.0)
    snrs = [r.snr for r in measured.records]
    assert snrs[0] == 1.0 and all(s > 5 for s in snrs[1:]) and snrs[-1] > snrs[1]
    assert all(r.snr == 1.0 for r in fixed.records)
    assert err["angle_deg"] < 0.7 * err_fixed["angle_deg"], (err, err_fixed)
    assert err["shift_px"] <= 1.1 * err_fixed["shift_px"], (err, err_fixed)


def test_noisy_data_keep_sparx_constant_exactly(shared_data, tmp_path):
    """relion_sim/noisy (SNR 0.1): the scores stay below 0.71, so the default is SPARX's snr 1, pose for pose."""
    measured, _ = _refine(shared_data, tmp_path, "noisy", 2)
    fixed, _ = _refine(shared_data, tmp_path, "noisy", 2, snr=1.0)
    assert all(r.criterion_after < 1 / math.sqrt(2) for r in measured.records if r.criterion_after is not None)
    assert [r.snr for r in measured.records] == [1.0] * 3
    np.testing.assert_array_equal(measured.poses, fixed.poses)
