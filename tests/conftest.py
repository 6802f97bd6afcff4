"""Shared fixtures: paths to the read-only test data beside the project (../shared/data) and in tests/data; the
CPU/GPU twin ``backend``; the strict CuPy stand-in; the MPI launcher."""
from __future__ import annotations

import os
import shutil
import sys
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


@pytest.fixture
def kernel_cache(tmp_path_factory, monkeypatch) -> Path:
    """The kernel build cache of the ``backend`` twins: one per test session (each kernel compiled once, the user's
    cache left alone). A module overrides it for another (test_kernel_build.py: a private one per test)."""
    folder = tmp_path_factory.getbasetemp() / "kernel-cache"
    monkeypatch.setenv("GPU_ALI3D_CACHE", str(folder))
    return folder


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def backend(request, kernel_cache):
    """The CPU/GPU twin: each test that takes it runs on the CPU backend (the OpenMP build) and, where a CUDA device
    is usable, on the GPU (ids ``[cpu]`` / ``[gpu]``; the ``gpu`` one is skipped elsewhere)."""
    from gpu_ali3d.backend import make_backend
    return make_backend(request.param)


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"          # the MPI wheel's launcher, same MPI as mpi4py's
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


@pytest.fixture(scope="session")
def mpiexec() -> str:
    """The launcher; skips without mpi4py or mpiexec, fails instead with GPU_ALI3D_REQUIRE_MPI=1 (set by .ci/run)."""
    missing = pytest.fail if os.environ.get("GPU_ALI3D_REQUIRE_MPI") == "1" else pytest.skip
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        missing("mpi4py is not installed (pip install 'gpu-ali3d[mpi]' mpich)")
    launcher = _mpiexec()
    if launcher is None:
        missing("no mpiexec found (beside python or on PATH)")
    return launcher


def smooth_random_map(rng, M: int):
    """A smooth random map (Gaussian low-pass, sigma 0.15 cycles/pixel) inside a sphere of radius M // 2 - 3:
    float64 (M, M, M), numpy order (z, y, x), centre M // 2. Shared by the objective and alignment tests."""
    import numpy as np

    vol = rng.standard_normal((M, M, M))
    f = np.meshgrid(np.fft.fftfreq(M), np.fft.fftfreq(M), np.fft.rfftfreq(M), indexing="ij")
    vol = np.fft.irfftn(np.fft.rfftn(vol) * np.exp(-sum(a ** 2 for a in f) / (2 * 0.15 ** 2)), s=vol.shape,
                        axes=(0, 1, 2))
    c = np.arange(M) - M // 2
    return vol * ((c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2) < (M // 2 - 3) ** 2)
