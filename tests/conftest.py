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


def _gpu_available() -> bool:
    """True when cupy imports and sees at least one CUDA device (never on the project's CPU-only machines)."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason, where no CUDA device is usable; their CPU twins run."""
    if any("gpu" in item.keywords for item in items) and not _gpu_available():
        skip = pytest.mark.skip(reason="needs cupy and a CUDA device (the CPU twin of this test runs)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def standin():
    """A fresh strict stand-in for CuPy (gpu_ali3d.standin) with one device and zeroed counts."""
    from gpu_ali3d.standin import make_standin
    return make_standin()


@pytest.fixture
def standin_backend(standin):
    """A "gpu" Backend over ``standin``: the GPU host path, with the CPU kernel build behind the GPU launch
    interface. ``standin_backend.counts`` are the stand-in's counts (launches, syncs, h2d/d2h bytes, mixing)."""
    from gpu_ali3d.backend import make_standin_backend
    return make_standin_backend(standin)
