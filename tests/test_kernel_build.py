"""Every kernel compiles for every target (nvcc sm_80/sm_90, NVRTC when cupy is present, host C++ + OpenMP),
the build cache follows header edits, the portability constructs give the right answer on the CPU, and the kernel
sources ship inside the package (wheel and regular install)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gpu_ali3d import kernels

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


def _nvrtc_or_skip():
    """cupy.cuda.nvrtc with a loadable NVRTC library (cupy-cuda12x + nvidia-cuda-nvrtc-cu12; no GPU needed), else
    skip, or fail where $GPU_ALI3D_REQUIRE_NVRTC=1 (CI, which installs both)."""
    def unavailable(reason):
        if os.environ.get("GPU_ALI3D_REQUIRE_NVRTC") == "1":
            pytest.fail(f"GPU_ALI3D_REQUIRE_NVRTC=1 but {reason}")
        pytest.skip(reason)

    try:
        from cupy.cuda import nvrtc
    except ImportError:
        unavailable("cupy is not installed: pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12 (no GPU needed)")
    try:
        nvrtc.getVersion()
    except Exception as err:  # cupy without the nvidia-cuda-nvrtc wheel
        unavailable(f"cupy is installed but NVRTC cannot be loaded ({err}): pip install nvidia-cuda-nvrtc-cu12")
    return nvrtc


# compute_XX gives PTX; sm_XX gives a cubin, which is what cupy.RawModule builds on an A100 / H100.
@pytest.mark.parametrize("arch", ["compute_80", "compute_90", "sm_80", "sm_90"])
@pytest.mark.parametrize("name", KERNELS)
def test_nvrtc_compiles(name, arch):
    _nvrtc_or_skip()
    assert b".entry" in kernels.nvrtc_check(name, arch)


@pytest.mark.parametrize("name", KERNELS)
def test_cpu_build(name, cache):
    lib = kernels.cpu_build(name)
    if name in kernels.FAST_MODULES:          # the objective's kernels: one entry point per interpolation
        assert all(hasattr(lib, f"{name}_{kind}") for kind in kernels.INTERP_ENTRY.values())
    else:
        assert hasattr(lib, name)
    assert len(list(cache.glob("*.so"))) == 1
    assert not list(cache.glob("*.tmp"))          # temporary names renamed away


def test_cpu_cache_is_readable_by_every_user_under_a_restrictive_umask(tmp_path):
    """A cache filled by one user (root building the Docker image) must load for every other: the library is
    written 0755 and the folders the build creates 0755, whatever the umask (mkstemp's 0600 plus the linker's
    execute bits gave 0711 before)."""
    cache = tmp_path / "made" / "by" / "cpu_build"          # three folders the build must create
    old = os.umask(0o077)
    try:
        lib = kernels.cpu_library_path("selftest", cache=cache)
    finally:
        os.umask(old)
    mode = lib.stat().st_mode & 0o777
    assert mode & 0o044 == 0o044, f"cached library mode {oct(mode)}: not readable by group and others"
    for folder in (cache, cache.parent, cache.parent.parent):
        mode = folder.stat().st_mode & 0o777
        assert mode & 0o055 == 0o055, f"{folder} mode {oct(mode)}: others cannot list or enter it"
    assert kernels.cpu_build("selftest", cache=cache).selftest is not None


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


def test_kernel_sources_found_in_the_package_or_the_checkout():
    assert (kernels.KERNEL_DIR / "portable.cuh").is_file()
    assert kernels.KERNEL_DIR.name in ("_kernels", "kernels")


def test_wheel_and_regular_install_carry_the_kernel_sources(tmp_path):
    """``pip wheel`` (offline: no build isolation, the venv's setuptools from the test extra) of a copy of the
    project holds every kernels/*.cu, *.cuh and every module of the package; installed from that wheel with
    ``pip install --target``, the package finds its kernels in gpu_ali3d/_kernels and inlines them."""
    setuptools = pytest.importorskip("setuptools", reason="building a wheel offline needs setuptools>=77 "
                                     "(pip install -e '.[test]')")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build this project offline "
                    "(pip install -e '.[test]')")
    project = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"                        # a copy, so the build leaves nothing in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(project / name, src / name)
    for name in ("gpu_ali3d", "kernels"):
        shutil.copytree(project / name, src / name, ignore=ignore)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    proc = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist),
                           str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = dist.glob("gpu_ali3d-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (project / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))
    assert {"score.cu", "portable.cuh", "gridding.cuh"} <= set(sources)
    assert {f"gpu_ali3d/_kernels/{s}" for s in sources} <= names
    modules = {p.relative_to(project).as_posix() for p in (project / "gpu_ali3d").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel (add their package to pyproject.toml): " \
                             f"{sorted(modules - names)}"

    target = tmp_path / "site"
    proc = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probe = ("from gpu_ali3d import kernels; print(kernels.KERNEL_DIR); print(*kernels.kernel_names()); "
             "assert '#include \"' not in kernels.kernel_source('score')")
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    kernel_dir, names_line = proc.stdout.splitlines()
    assert Path(kernel_dir) == (target / "gpu_ali3d" / "_kernels").resolve()
    assert names_line.split() == KERNELS


def test_missing_kernel_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no kernel source"):
        kernels.kernel_source("no_such_kernel")


@pytest.fixture
def kernel_cache(cache):
    """The CPU/GPU twin fixture ``backend`` (conftest.py) builds into this module's private cache."""
    return cache


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


# ------------------------------------------------------------------------ GPU loading, on a stand-in for CuPy
class _FakeCompileException(Exception):
    """cupy.cuda.compiler.CompileException's interface: (msg, source, name, options), get_message()."""

    def __init__(self, msg, source, name, options, backend="nvrtc"):
        super().__init__(msg)
        self._msg = msg

    def get_message(self):
        return self._msg


class _FakeRawModule:
    """Records what cupy.RawModule is given and whether it is compiled; ``fail`` is raised by compile()."""

    made: list = []
    launches: list = []
    fail: Exception | None = None

    def __init__(self, code, options=(), **kwargs):
        self.code, self.options, self.kwargs, self.compiles, self.functions = code, options, kwargs, 0, []
        _FakeRawModule.made.append(self)

    def compile(self, log_stream=None):
        self.compiles += 1
        if _FakeRawModule.fail is not None:
            raise _FakeRawModule.fail

    def get_function(self, name):
        assert self.compiles, "get_function before compile: the module was not compiled at load"
        self.functions.append(name)
        return lambda grid, block, args, shared_mem=0: self.launches.append((name, grid, block, args, shared_mem))


@pytest.fixture
def fake_cupy(monkeypatch):
    """`import cupy` inside kernels.py gets a stand-in whose RawModule records its calls (no GPU, with or without
    cupy installed); the per-process module caches are emptied before and after."""
    cupy, cuda, compiler = (types.ModuleType(n) for n in ("cupy", "cupy.cuda", "cupy.cuda.compiler"))
    compiler.CompileException = _FakeCompileException
    cuda.compiler, cupy.cuda, cupy.RawModule = compiler, cuda, _FakeRawModule
    for name, mod in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.compiler", compiler)):
        monkeypatch.setitem(sys.modules, name, mod)
    _FakeRawModule.made, _FakeRawModule.launches, _FakeRawModule.fail = [], [], None
    kernels.gpu_module.cache_clear()
    kernels._gpu_function.cache_clear()
    yield _FakeRawModule
    kernels.gpu_module.cache_clear()
    kernels._gpu_function.cache_clear()
    _FakeRawModule.fail = None


def test_gpu_load_compiles_at_once_with_the_nvrtc_options(fake_cupy):
    ks = kernels.KernelSet("gpu")
    ks.load("selftest")
    (module,) = fake_cupy.made
    assert module.compiles == 1, "KernelSet.load must compile the RawModule (CuPy alone waits for a launch)"
    assert module.code == kernels.kernel_source("selftest")
    assert module.options is kernels.NVRTC_OPTIONS          # the list CI's NVRTC and nvcc checks use for it
    # a launch reuses the compiled module: no second RawModule, no second compile
    ks.launch("selftest", "selftest", 3, [np.int32(1)])
    assert fake_cupy.made == [module] and module.compiles == 1
    assert module.functions == ["selftest"]
    assert fake_cupy.launches == [("selftest", (3,), (kernels.GPU_THREADS,), (np.int32(1),), 0)]


def test_gpu_compile_error_names_the_kernel_file_and_nvrtc_log(fake_cupy):
    log = 'score.cu(42): error: identifier "oops" is undefined\n1 error detected in the compilation of "score.cu".'
    fake_cupy.fail = _FakeCompileException(log, "source", "kern.cu", kernels.nvrtc_options("score"))
    with pytest.raises(RuntimeError) as err:
        kernels.KernelSet("gpu").load("score")
    message = str(err.value)
    assert str(kernels.KERNEL_DIR / "score.cu") in message
    assert 'identifier "oops" is undefined' in message
    assert " ".join(kernels.nvrtc_options("score")) in message
    # a failed compile is not cached: the next load tries again
    fake_cupy.fail = None
    kernels.KernelSet("gpu").load("score")
    assert len(fake_cupy.made) == 2 and fake_cupy.made[-1].compiles == 1


def test_gpu_missing_cuda_headers_is_a_clear_error(fake_cupy):
    fake_cupy.fail = RuntimeError("Failed to find CUDA headers. Please install the CUDA Toolkit or set CUDA_PATH")
    with pytest.raises(RuntimeError, match=r"selftest\.cu .*Failed to find CUDA headers.*gpu-ali3d\[cuda12\]"):
        kernels.KernelSet("gpu").load("selftest")


def test_gpu_compile_error_with_cupys_own_exception(monkeypatch):
    """The same path with the real cupy (CI installs it; no GPU needed): CuPy's CompileException is the one caught."""
    cupy = pytest.importorskip("cupy")
    from cupy.cuda.compiler import CompileException

    class Failing:
        def __init__(self, code, options=(), **kwargs):
            self.code, self.options = code, options

        def compile(self, log_stream=None):
            raise CompileException('selftest.cu(7): error: expected a ";"', self.code, "x.cu", self.options)

    monkeypatch.setattr(cupy, "RawModule", Failing)
    kernels.gpu_module.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"(?s)NVRTC failed on kernel file .*selftest\.cu.*expected a"):
            kernels.gpu_module("selftest")
    finally:
        kernels.gpu_module.cache_clear()
