"""Shared fixtures: paths to the read-only test data beside the project (../shared/data) and in tests/data."""
from __future__ import annotations

from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"
TEST_DATA = PROJECT / "tests" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: the 70S ribosome map and the RELION-simulated particle sets (read-only)."""
    if not (SHARED_DATA / "relion_sim").is_dir():
        pytest.fail(f"test data missing: {SHARED_DATA} (the project's tests read ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def test_data() -> Path:
    return TEST_DATA


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(1234)
