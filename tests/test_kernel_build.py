"""Every kernel compiles for every target (nvcc sm_80/sm_90, NVRTC when cupy is present, host C++ + OpenMP),
the build cache follows header edits, and the portability constructs give the right answer on the CPU."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from gpu_ali3d import kernels
from gpu_ali3d.backend import Backend, make_backend

KERNELS = kernels.kernel_names()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private build cache, so these tests compile for real and leave the user's cache alone."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("GPU_ALI3D_CACHE", str(folder))
    return folder


def test_kernel_files_found():
    assert {"selftest", "score"} <= set(KERNELS)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", KERNELS)
def test_nvcc_compiles(name, arch):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH (CI has it): the CUDA build of the kernels is not checked here")
    ptx = kernels.nvcc_check(name, arch)
    assert ".entry" in ptx


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("name", KERNELS)
def test_nvrtc_compiles(name, arch):
    nvrtc = pytest.importorskip("cupy.cuda.nvrtc", reason="cupy (with an NVRTC library) is not installed")
    try:
        nvrtc.getVersion()
    except Exception as err:  # cupy without the nvidia-cuda-nvrtc wheel
        pytest.skip(f"cupy is installed but NVRTC cannot be loaded: {err}")
    assert b".entry" in kernels.nvrtc_check(name, arch)


@pytest.mark.parametrize("name", KERNELS)
def test_cpu_build(name, cache):
    lib = kernels.cpu_build(name)
    assert hasattr(lib, name)
    assert len(list(cache.glob("*.so"))) == 1
    assert not list(cache.glob("*.tmp"))          # temporary names renamed away


def test_inlined_source_has_no_project_includes():
    for name in KERNELS:
        src = kernels.kernel_source(name)
        assert '#include "' not in src
        assert src.count("#ifndef GPU_ALI3D_PORTABLE_CUH") == 1


def test_cache_key_follows_header_edits(tmp_path, cache):
    src_dir = tmp_path / "kernels"
    shutil.copytree(kernels.KERNEL_DIR, src_dir)
    first = kernels.cpu_library_path("selftest", src_dir)
    assert kernels.cpu_library_path("selftest", src_dir) == first          # cached: same key
    header = src_dir / "portable.cuh"
    header.write_text(header.read_text() + "\n// an edit reached only through #include\n")
    second = kernels.cpu_library_path("selftest", src_dir)
    assert second != first and second.is_file() and first.is_file()


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        kernels.host_compiler()


def test_missing_kernel_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no kernel source"):
        kernels.kernel_source("no_such_kernel")


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def backend(request, cache) -> Backend:
    return make_backend(request.param)


@pytest.mark.parametrize("n_rows, n_cols", [(1, 1), (3, 4), (1000, 77), (50, 1000)])
def test_selftest_kernel(backend, n_rows, n_cols):
    """FOR_BLOCKS / FOR_THREADS / two consecutive block_sums / atomic_add / complex helpers, all outputs poisoned."""
    xp = backend.xp
    rng = np.random.default_rng(7)
    x_host = rng.standard_normal((n_rows, max(n_cols, 4))).astype(np.float32)[:, :n_cols].copy()
    if n_cols < 4:
        x_host = np.pad(x_host, ((0, 0), (0, 4 - n_cols)))      # the complex check reads 4 columns
        n_cols = 4
    x = xp.asarray(x_host)
    row_sums = xp.full((n_rows, 2), np.nan)
    total = xp.zeros(1)
    cprod = xp.full((n_rows, 2), np.nan, dtype=np.float32)
    backend.kernels.launch("selftest", "selftest", n_rows,
                           [x, np.int64(n_rows), np.int32(n_cols), row_sums, total, cprod])
    rs, tot, cp = (backend.to_host(a) for a in (row_sums, total, cprod))
    x64 = x_host.astype(np.float64)
    # float64 sums of float32 values: only summation order differs
    np.testing.assert_allclose(rs[:, 0], x64.sum(1), rtol=0, atol=1e-12 * n_cols)
    # float32 accumulation of x^2 (<= n_cols terms of O(1)): n_cols * eps32 relative bound
    np.testing.assert_allclose(rs[:, 1], (x64 ** 2).sum(1), rtol=n_cols * 6e-8)
    np.testing.assert_allclose(tot[0], x64.sum(), rtol=0, atol=1e-10 * x64.size)
    z = (x64[:, 0] + 1j * x64[:, 1]) * np.conj(x64[:, 2] + 1j * x64[:, 3])
    np.testing.assert_allclose(cp[:, 0] + 1j * cp[:, 1], z, rtol=0, atol=1e-5 * (1 + np.abs(z).max()))
