"""Single-source kernels (kernels/*.cu): build for the CPU (host C++ compiler + OpenMP) or load as a CuPy RawModule.

A kernel file ``kernels/<name>.cu`` includes project headers (``#include "portable.cuh"``); :func:`kernel_source`
inlines them (recursively, each header once) into one string, which is what every target compiles:

* CPU: :func:`cpu_build` runs ``c++ -O3 -fopenmp -shared -fPIC -x c++`` on that string and caches the library
  as ``<cache>/<key>.so``, key = sha256(source + flags + compiler version + target), written under a temporary
  name and renamed atomically, readable by every user (mode 0755, folders too). cache = ``$GPU_ALI3D_CACHE`` or ``~/.cache/gpu-ali3d`` (``$XDG_CACHE_HOME``).
* GPU: :func:`gpu_module` hands the same string to ``cupy.RawModule`` with the module's options
  (:func:`nvrtc_options`: :data:`NVRTC_OPTIONS`, or :data:`NVRTC_OPTIONS_FAST` for the objective's kernels) and
  compiles it at once (at :meth:`KernelSet.load`), so an NVRTC error names the kernel file before any work.
* CI (no GPU): :func:`nvcc_check` compiles it with ``nvcc --ptx`` and :func:`nvrtc_check` through
  ``cupy.cuda.nvrtc`` with the same options a GPU would use.

Launch wrappers (one per kernel) check dtype, contiguity and shape; callers never pass pointers.
cupy is imported lazily, only on the GPU path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np


def _find_kernel_dir() -> Path:
    """The kernel sources: ``gpu_ali3d/_kernels`` in an installed package (wheel, ``pip install .``; pyproject.toml
    installs the repository's ``kernels/`` under that name), else ``kernels/`` beside the package in a checkout
    (editable install, or the source tree on sys.path). Neither: the installed location, so that
    :func:`kernel_source` names it when it finds no source (importing this module never fails)."""
    package = Path(__file__).resolve().parent
    installed, checkout = package / "_kernels", package.parent / "kernels"
    if (installed / "portable.cuh").is_file() or not (checkout / "portable.cuh").is_file():
        return installed
    return checkout


#: The folder of the kernel sources (:func:`_find_kernel_dir`).
KERNEL_DIR = _find_kernel_dir()
#: Host compiler flags of the CPU build (the key includes them). No -ffast-math / -march=native: the CPU build
#: must give the answer the GPU gives, on every machine that shares a cache. -ffp-contract=off: the compiler fuses
#: no a * b + c of its own (g++ does in C++ modes where the target has FMA); the kernels write their fusions out
#: (portable.cuh fmadd).
CPU_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off", "-x", "c++")
#: Added to :data:`CPU_FLAGS` for :data:`FAST_MODULES` on an x86-64 host with AVX2 and FMA (:func:`cpu_flags`): the
#: objective's explicit fmadd become fused multiply-adds on the CPU, as on the GPU (13-25 % faster alignment at
#: box 128 on a 2-core AMD EPYC). A fixed micro-architecture level, not -march=native, so the binary (and its key)
#: is the same on every such machine.
CPU_FLAGS_FAST = ("-march=x86-64-v3",)
#: The exact options cupy.RawModule gets on a GPU (cupy adds the architecture), and CI's NVRTC/nvcc checks use.
#: --fmad=false: no contraction of a*b + c into fma, which the CPU build (-ffp-contract=off) does not do either, so
#: both targets round alike (a sample falls into the same voxel, a score agrees to the last bits).
NVRTC_OPTIONS = ("--std=c++17", "-DGPU_ALI3D_CUDA=1", "--fmad=false")
#: The options of the objective's kernels (score.cu, align.cu: :data:`FAST_MODULES`): fused multiply-add allowed.
#: Their results are compared with the CPU build's at float tolerances (tests/test_kernels.py), never bitwise, and
#: both kernels inline the same objective (score.cuh), so contraction moves a score's last bits on the GPU only.
#: The insertion keeps :data:`NVRTC_OPTIONS`: its deterministic mode needs the CPU's voxel choices and sums bitwise.
NVRTC_OPTIONS_FAST = ("--std=c++17", "-DGPU_ALI3D_CUDA=1", "--fmad=true")
#: Kernel files built with :data:`NVRTC_OPTIONS_FAST` (every other with :data:`NVRTC_OPTIONS`).
FAST_MODULES = frozenset({"score", "align"})
#: Mode of a cached CPU library and of the cache folders this module creates: readable by every user.
CACHE_FILE_MODE, CACHE_DIR_MODE = 0o755, 0o755
#: Threads per block of every GPU launch (a multiple of 32, as block_sum requires).
GPU_THREADS = 128
#: Upper bound on the GPU grid; FOR_BLOCKS grid-strides over the rest.
GPU_MAX_BLOCKS = 65535

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


def kernel_source(name: str, kernel_dir: str | os.PathLike | None = None) -> str:
    """The text of ``<kernel_dir>/<name>.cu`` with its project headers inlined (each once, recursively).

    kernel_dir : folder of the sources (default :data:`KERNEL_DIR`). ``#line`` directives keep compiler messages
    pointing at the original files. Raises FileNotFoundError for a missing kernel or header.
    """
    folder = Path(kernel_dir) if kernel_dir is not None else KERNEL_DIR
    path = folder / f"{name}.cu"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.cu"))
        raise FileNotFoundError(f"no kernel source {path}; kernels in {folder}: {available}")
    return _inline(path, folder, set())


def nvrtc_options(name: str) -> tuple:
    """The NVRTC options of kernel file ``<name>.cu`` (what cupy.RawModule gets, and CI's NVRTC and nvcc checks):
    :data:`NVRTC_OPTIONS_FAST` for :data:`FAST_MODULES`, else :data:`NVRTC_OPTIONS`."""
    return NVRTC_OPTIONS_FAST if name in FAST_MODULES else NVRTC_OPTIONS


def cpu_flags(name: str, fast: bool | None = None) -> tuple:
    """The host compiler flags of kernel file ``<name>.cu``: :data:`CPU_FLAGS`, plus :data:`CPU_FLAGS_FAST` for
    :data:`FAST_MODULES` where :func:`cpu_has_fma` (the mirror of :func:`nvrtc_options`). The others (the
    deterministic insertion) are built for baseline x86-64, which has no fused multiply-add to contract into, so
    they round as the GPU's --fmad=false build does. fast : True / False instead of asking FAST_MODULES (the
    stand-in's RawModule decides from its NVRTC options)."""
    if (name in FAST_MODULES if fast is None else fast) and cpu_has_fma():
        return CPU_FLAGS + CPU_FLAGS_FAST
    return CPU_FLAGS


@lru_cache(maxsize=None)
def cpu_has_fma() -> bool:
    """Whether this host runs x86-64-v3 code (AVX2, FMA, BMI2; numpy's CPU feature detection); False elsewhere and
    where $GPU_ALI3D_CPU_BASELINE is set (to build every kernel for baseline x86-64)."""
    if os.environ.get("GPU_ALI3D_CPU_BASELINE") or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:                                  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return all(features.get(f, False) for f in ("AVX", "AVX2", "FMA3", "F16C", "BMI", "BMI2"))


def cache_dir() -> Path:
    """Where CPU builds are cached: $GPU_ALI3D_CACHE, else $XDG_CACHE_HOME/gpu-ali3d, else ~/.cache/gpu-ali3d."""
    env = os.environ.get("GPU_ALI3D_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpu-ali3d"


def host_compiler() -> str:
    """The host C++ compiler: $CXX, else c++, else g++. RuntimeError if none is found."""
    for candidate in (os.environ.get("CXX"), "c++", "g++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise RuntimeError("no C++ compiler found for the CPU kernels (tried $CXX, c++, g++); install g++ "
                       "(e.g. apt-get install g++) or set CXX")


def build_key(source: str, flags, compiler_version: str, target: str) -> str:
    """sha256 over everything that decides the binary: source (headers inlined), flags, compiler, target."""
    h = hashlib.sha256()
    for part in (source, "\0".join(flags), compiler_version, target):
        h.update(part.encode())
        h.update(b"\0\1\0")
    return h.hexdigest()


def cpu_library_path(name: str, kernel_dir=None, cache=None, *, fast: bool | None = None) -> Path:
    """Build ``<name>.cu`` for the CPU if it is not cached; return the path of the shared library."""
    source = kernel_source(name, kernel_dir)
    cxx = host_compiler()
    flags = cpu_flags(name, fast)
    key = build_key(source, flags, _compiler_version(cxx), f"cpu-{platform.system()}-{platform.machine()}")
    folder = Path(cache) if cache is not None else cache_dir()
    out = folder / f"{key}.so"
    if out.is_file():
        return out
    _make_cache_dir(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".so.tmp", dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, "-", "-o", tmp], input=source, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling kernel {name!r} for the CPU failed ({cxx}):\n{proc.stderr}")
        # mkstemp made the file 0600 and the linker only adds execute bits (0711): make it readable by every user,
        # whatever the umask, so a cache built by one user id (root building the image) loads for any other
        os.chmod(tmp, CACHE_FILE_MODE)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def cpu_build(name: str, kernel_dir=None, cache=None, *, fast: bool | None = None) -> ctypes.CDLL:
    """The CPU build of kernel file ``<name>.cu`` loaded with ctypes (compiled and cached on first use); fast as
    :func:`cpu_flags`."""
    return _load_cdll(str(cpu_library_path(name, kernel_dir, cache, fast=fast)))


@lru_cache(maxsize=None)
def gpu_module(name: str, kernel_dir=None):
    """``cupy.RawModule`` of kernel file ``<name>.cu`` (same inlined source, :func:`nvrtc_options`), compiled now.

    CuPy compiles a RawModule lazily, at its first ``get_function``; this compiles it at once, so an error surfaces
    when the kernels are loaded, before any work. One module per (name, kernel_dir) for the life of the process
    (every launch reuses it). RuntimeError naming the kernel file, with NVRTC's log, if it does not compile.
    """
    import cupy  # lazy: the GPU path only
    from cupy.cuda.compiler import CompileException
    path = (Path(kernel_dir) if kernel_dir is not None else KERNEL_DIR) / f"{name}.cu"
    options = nvrtc_options(name)
    module = cupy.RawModule(code=kernel_source(name, kernel_dir), options=options)
    try:
        module.compile()
    except CompileException as err:
        raise RuntimeError(f"NVRTC failed on kernel file {path} (options {' '.join(options)}):\n"
                           f"{err.get_message()}") from err
    except Exception as err:       # no CUDA headers, no NVRTC library, no device: CuPy's own message
        hint = (" (CuPy finds the CUDA headers in the NVIDIA wheels: pip install 'gpu-ali3d[cuda12]', or "
                "[cuda13]; or set CUDA_PATH to a CUDA toolkit)" if "header" in str(err).lower() else "")
        raise RuntimeError(f"compiling kernel file {path} for the GPU failed: {type(err).__name__}: {err}"
                           f"{hint}") from err
    return module


def nvcc_check(name: str, arch: str = "sm_80", kernel_dir=None) -> str:
    """Compile the inlined source of ``<name>.cu`` to PTX with nvcc (CI's check; needs no GPU). Returns the PTX.

    arch : e.g. "sm_80", "sm_90". RuntimeError with nvcc's messages on failure, or if nvcc is not on PATH.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc is not on PATH; install the CUDA toolkit to check the GPU kernels")
    source = kernel_source(name, kernel_dir)
    with tempfile.TemporaryDirectory() as tmp:
        src, ptx = Path(tmp) / f"{name}.cu", Path(tmp) / f"{name}.ptx"
        src.write_text(source)
        proc = subprocess.run([nvcc, "--ptx", f"-arch={arch}", *nvrtc_options(name), str(src), "-o", str(ptx)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on kernel {name!r} for {arch}:\n{proc.stderr}")
        return ptx.read_text()


def nvrtc_check(name: str, arch: str = "compute_80", kernel_dir=None) -> bytes:
    """Compile with NVRTC through ``cupy.cuda.nvrtc`` and the module's :func:`nvrtc_options` (what cupy.RawModule
    would do).

    Needs cupy and an NVRTC library, not a GPU. Returns the PTX.
    """
    from cupy.cuda import nvrtc  # lazy
    source = kernel_source(name, kernel_dir)
    prog = nvrtc.createProgram(source, f"{name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [*nvrtc_options(name), f"--gpu-architecture={arch}"])
        except nvrtc.NVRTCError as err:
            raise RuntimeError(f"NVRTC failed on kernel {name!r} for {arch}:\n{nvrtc.getProgramLog(prog)}") from err
        return nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)


def kernel_names(kernel_dir=None) -> list[str]:
    """The kernel files (``*.cu`` stems) in the kernel folder."""
    folder = Path(kernel_dir) if kernel_dir is not None else KERNEL_DIR
    return sorted(p.stem for p in folder.glob("*.cu"))


@dataclass(frozen=True)
class KernelSet:
    """The kernels of one target, under the same names on both: ``launch(module, kernel, n_blocks, args)``.

    target : "cpu" (ctypes over the OpenMP build) or "gpu" (cupy RawModule). kernel_dir : source folder or None.
    """

    target: str
    kernel_dir: str | None = None

    def load(self, module: str) -> None:
        """Build (or find in the cache) and load ``<module>.cu`` now, so a compiler error surfaces before any work.

        Loaded kernels are kept for the life of the process (keyed by module, kernel and folder)."""
        if self.target == "cpu":
            cpu_build(module, self.kernel_dir)
        elif self.target == "gpu":
            gpu_module(module, self.kernel_dir)        # compiles now (CuPy alone would wait for the first launch)
        else:
            raise ValueError(f"target={self.target!r}; expected 'cpu' or 'gpu'")

    def launch(self, module: str, kernel: str, n_blocks: int, args, shared_mem: int = 0) -> None:
        """Run ``kernel`` of ``<module>.cu`` over ``n_blocks`` blocks (FOR_BLOCKS items).

        args : the kernel's arguments in order, each an array of the backend's array module (C-contiguous, dtype
        already checked by the caller's wrapper) or a numpy scalar (np.int32, np.int64, np.float32, np.float64)
        whose type is the C parameter's type.
        shared_mem : bytes of dynamic shared memory per block (portable.cuh DYNAMIC_SHARED) of a GPU launch; the
        CPU build sizes its arrays from the kernel's own arguments and ignores it.
        """
        if n_blocks <= 0:
            return
        if self.target == "cpu":
            fn = _cpu_function(module, kernel, self.kernel_dir)
            fn(*(_ctypes_arg(a) for a in args))
        elif self.target == "gpu":
            fn = _gpu_function(module, kernel, self.kernel_dir)
            grid = (int(min(n_blocks, GPU_MAX_BLOCKS)),)
            fn(grid, (GPU_THREADS,), tuple(args), shared_mem=int(shared_mem))
        else:
            raise ValueError(f"target={self.target!r}; expected 'cpu' or 'gpu'")


# ----------------------------------------------------------------------------------------------- score.cu
#: PreparedReference.interpolation -> KernelReference.kind (kernels/gridding.cuh INTERP_KB, INTERP_TRILINEAR),
#: which picks the objective kernels' entry point (:data:`INTERP_ENTRY`).
INTERP_KINDS = {"kb": 0, "trilinear": 1}
#: Limit of kernels/gridding.cuh: MAX_TAPS.
MAX_TAPS = 16
#: Intervals of the Kaiser-Bessel window table (kernels/gridding.cuh kb_window, :func:`kb_window_table`).
KB_TABLE_SIZE = 4096
#: Limit of kernels/score.cu: the largest |kx|, |ky| of a sample (SCORE_MAX_K, the size of its phase table).
SCORE_MAX_K = 1024
#: INTERP_KINDS value -> suffix of the objective kernels' entry points (score_kb, align_trilinear, ...).
INTERP_ENTRY = {0: "kb", 1: "trilinear"}


def phase_table_bytes(k_index: int) -> int:
    """Dynamic shared memory per block of score.cu and align.cu: the shift-phase table for samples up to
    max |kx|, |ky| = k_index, 3 k_index + 2 complex64 (kernels/score.cuh score_phase_entries)."""
    return (3 * int(k_index) + 2) * np.dtype(np.complex64).itemsize


@dataclass(frozen=True)
class KernelReference:
    """A PreparedReference in the kernel's dtypes, on the backend's device (:func:`kernel_reference`).

    data : complex64 (2E + 2h + 1, 2E + 2h + 1, E + 1 + 2h), C-contiguous: the layout of
    :class:`gpu_ali3d.gridding.PreparedReference` (axes z, y, x; halo h) cropped to the frequencies |u_a| <= E
    (E = N // 2: all of it). N, halo, taps : ints. extent : E, the largest sample radius it serves.
    kind : 0 Kaiser-Bessel, 1 trilinear. window : float32 (KB_TABLE_SIZE + 1,) backend array, the KB window table
    (:func:`kb_window_table`; for trilinear a placeholder the kernel does not read).
    """

    data: object
    N: int
    halo: int
    taps: int
    kind: int
    window: object
    extent: int


@dataclass(frozen=True)
class KernelImages:
    """PreparedImages in the kernel's dtypes, on the backend's device (:func:`kernel_images`).

    freqs : float32 (S, 2) (kx, ky) padded-grid units. weights : float32 (S,). data : complex64 (n, S).
    ctf : float32 (n, S) or None. power : float64 (n,), sum_k weights |data|^2 (from the float64 data). N : int.
    k_index : int, the largest |kx| or |ky| of a sample (the size of score.cu's phase table).
    k_reach : float, the largest |k| of a sample (a reference must extend that far).
    """

    freqs: object
    weights: object
    data: object
    ctf: object
    power: object
    N: int
    k_index: int
    k_reach: float

    def __len__(self) -> int:
        return self.data.shape[0]


def kernel_reference(backend, ref, kmax: float | None = None) -> KernelReference:
    """Convert a :class:`gpu_ali3d.gridding.PreparedReference` once (per iteration) for :func:`score_sums`.

    kmax : the largest sample radius (padded-grid units) it will serve, e.g. PreparedImages.kmax; the copy is
        cropped to |u_a| <= ceil(kmax) (and its halo), so the kernel's working set is the band it reads, not the
        whole cube: at box 64 and a 20 A limit, 1 MB instead of 10 MB. None keeps all of it (E = N / 2).
    """
    if ref.interpolation not in INTERP_KINDS:
        raise ValueError(f"ref.interpolation={ref.interpolation!r}; expected one of {tuple(INTERP_KINDS)}")
    if ref.taps > MAX_TAPS:
        raise ValueError(f"the kernels handle at most {MAX_TAPS} taps per axis; got kb_width={ref.taps}")
    n, h = int(ref.N), int(ref.halo)
    if kmax is not None and not (np.isfinite(kmax) and kmax > 0):
        raise ValueError(f"kmax={kmax!r} must be a positive frequency in padded-grid units (or None for all)")
    extent = n // 2 if kmax is None else min(n // 2, int(np.ceil(kmax)))
    lo = n // 2 - extent
    cropped = ref.data[lo:lo + 2 * extent + 2 * h + 1, lo:lo + 2 * extent + 2 * h + 1, :extent + 1 + 2 * h]
    xp = backend.xp
    data = xp.ascontiguousarray(xp.asarray(np.ascontiguousarray(cropped), dtype=np.complex64))
    window = kb_window_table(ref) if ref.interpolation == "kb" else np.zeros(2, np.float32)
    return KernelReference(data=data, N=n, halo=h, taps=int(ref.taps), kind=INTERP_KINDS[ref.interpolation],
                           window=xp.asarray(window), extent=extent)


def band_reference(backend, volume, kmax: float | None = None, *, pad: int = 2, interpolation: str = "trilinear",
                   kb_width: int | None = None, kb_alpha: float | None = None) -> KernelReference:
    """``kernel_reference(backend, gridding.prepare_reference(volume, ...), kmax)`` made on the backend's device
    and only for the band: the map is deapodised on the host (M^3), zero-padded and transformed on xp, and just the
    haloed crop |u_a| <= ceil(kmax) is gathered from the unshifted transform (Friedel mates for u_x < 0 and
    u_x > N/2), so neither the whole centred cube nor its halo is ever made. The same values as the host path (the
    same transform; the gathers only move them). Arguments as :func:`gpu_ali3d.gridding.prepare_reference` and
    :func:`kernel_reference`; kb_width / kb_alpha default to gridding's."""
    import math

    import scipy.fft

    from . import gridding

    kb_width = gridding.KB_WIDTH if kb_width is None else kb_width
    kb_alpha = gridding.KB_ALPHA if kb_alpha is None else kb_alpha
    vol = gridding.as_cube(volume)
    if interpolation not in INTERP_KINDS:
        raise ValueError(f"interpolation={interpolation!r}; expected one of {tuple(INTERP_KINDS)}")
    m = vol.shape[0]
    gridding._check_window(m, pad, kb_width, kb_alpha)
    taps = kb_width if interpolation == "kb" else 2
    if taps > MAX_TAPS:
        raise ValueError(f"the kernels handle at most {MAX_TAPS} taps per axis; got kb_width={taps}")
    if kmax is not None and not (np.isfinite(kmax) and kmax > 0):
        raise ValueError(f"kmax={kmax!r} must be a positive frequency in padded-grid units (or None for all)")
    n, h = pad * m, taps // 2
    extent = n // 2 if kmax is None else min(n // 2, int(math.ceil(kmax)))
    if interpolation == "kb":
        d = gridding.kb_deapodisation(m, pad=pad, kb_width=kb_width, kb_alpha=kb_alpha)
    else:
        d = gridding.trilinear_deapodisation(m, pad=pad)
    xp = backend.xp
    padded = xp.zeros((n, n, n))
    padded[:m, :m, :m] = xp.asarray(vol / (d[:, None, None] * d[None, :, None] * d[None, None, :]))
    padded = xp.roll(padded, (-(m // 2),) * 3, axis=(0, 1, 2))     # the map's centre voxel at index 0
    spec = scipy.fft.rfftn(padded, workers=-1) if xp is np else xp.fft.rfftn(padded)
    del padded
    u = np.arange(-extent - h, extent + h + 1)                         # z and y frequencies of the crop

    def rows(index):                                                   # spec at z, y indices (FFT order) index
        at = xp.asarray(index % n)
        return xp.take(xp.take(spec, at, axis=0), at, axis=1)

    direct, mirror = rows(u), xp.conj(rows(-u))                        # F(u_z, u_y, .), conj F(-u_z, -u_y, .)
    ux = np.arange(-h, extent + h + 1)
    parts = []
    for lo, hi, side in ((-h, 0, mirror), (0, n // 2 + 1, direct), (n // 2 + 1, extent + h + 1, mirror)):
        sel = ux[(ux >= lo) & (ux < hi)]
        if len(sel):
            index = sel if side is direct else (-sel) % n               # F(.., -k)^* for k < 0 and k > N/2
            parts.append(xp.take(side, xp.asarray(index), axis=2))
    data = xp.ascontiguousarray(xp.concatenate(parts, axis=2).astype(np.complex64))
    shape = gridding.PreparedReference(data=np.zeros((1, 1, 1), np.complex128), M=m, N=n, pad=int(pad),
                                       kb_width=int(kb_width), kb_alpha=float(kb_alpha),
                                       interpolation=interpolation, halo=h)       # the window's parameters
    window = kb_window_table(shape) if interpolation == "kb" else np.zeros(2, np.float32)
    return KernelReference(data=data, N=n, halo=h, taps=int(taps), kind=INTERP_KINDS[interpolation],
                           window=xp.asarray(window), extent=extent)


def kb_window_table(ref, size: int = KB_TABLE_SIZE) -> np.ndarray:
    """float32 (size + 1,): the Kaiser-Bessel window of a PreparedReference at d = i * (K / 2) / size, i = 0..size
    (:func:`gpu_ali3d.gridding.kb_weights` in float64), which the kernels interpolate linearly for |d| < K / 2.
    The last entry is the window's limit at the edge, 1 / I0(beta) (the window drops to 0 only beyond it), so
    the last interval interpolates the curve, not the step."""
    from scipy.special import i0

    from .gridding import kb_weights

    d = np.arange(size + 1) * (0.5 * ref.kb_width / size)
    table = kb_weights(d, kb_width=ref.kb_width, kb_alpha=ref.kb_alpha, pad=ref.pad)
    table[-1] = 1.0 / i0(ref.beta)
    return table.astype(np.float32)


def kernel_images(backend, prepared) -> KernelImages:
    """Convert a :class:`gpu_ali3d.score.PreparedImages` once (per iteration) for :func:`score_sums`."""
    xp = backend.xp

    def conv(a, dtype):
        return None if a is None else xp.ascontiguousarray(xp.asarray(a, dtype=dtype))

    freqs = np.asarray(prepared.freqs)
    if len(freqs) and not np.array_equal(freqs, np.round(freqs)):
        raise ValueError("the kernels take integer sample frequencies (padded-grid units), as prepare_images makes")
    k_index = int(np.abs(freqs).max()) if len(freqs) else 0
    k_reach = float(np.sqrt((freqs ** 2).sum(axis=1).max())) if len(freqs) else 0.0
    if k_index > SCORE_MAX_K:
        raise ValueError(f"samples up to |k| = {k_index} exceed the score kernel's {SCORE_MAX_K} (padded-grid "
                         f"units); lower the resolution limit or the padding")
    return KernelImages(freqs=conv(freqs, np.float32), weights=conv(prepared.weights, np.float32),
                        data=conv(prepared.data, np.complex64), ctf=conv(prepared.ctf, np.float32),
                        power=conv(prepared.power, np.float64), N=int(prepared.N), k_index=k_index,
                        k_reach=k_reach)


def score_sums(backend, kref: KernelReference, kimg: KernelImages, poses, image_index, out=None, *,
               check_index: bool = True):
    """Launch kernels/score.cu: the two sums of the objective for each (image, pose) pair.

    poses : float64 (n, 5), C-contiguous, backend array: phi, theta, psi (degrees), sx, sy (pixels).
    image_index : int64 (n,), backend array, values in [0, len(kimg)).
    out : float64 (n, 2) backend array to write into (every element is written), or None for a new one.
    Returns out: [:, 0] = sum_k w Re(conj(X_k) P_k), [:, 1] = sum_k w |P_k|^2 (score.py's ``cross`` and ``ppow``).
    """
    xp = backend.xp
    if kref.N != kimg.N:
        raise ValueError(f"reference N={kref.N} but images N={kimg.N}; prepare both with the same box and pad")
    if kimg.k_reach > kref.extent:
        raise ValueError(f"the images have samples up to |k| = {kimg.k_reach:.2f} but the reference was cropped to "
                         f"{kref.extent}; convert it with kernel_reference(..., kmax=prepared.kmax)")
    n_img, n_s = kimg.data.shape
    d, dx = 2 * kref.extent + 2 * kref.halo + 1, kref.extent + 1 + 2 * kref.halo
    _check_array("ref.data", kref.data, np.complex64, (d, d, dx), xp)
    _check_array("freqs", kimg.freqs, np.float32, (n_s, 2), xp)
    _check_array("weights", kimg.weights, np.float32, (n_s,), xp)
    _check_array("data", kimg.data, np.complex64, (n_img, n_s), xp)
    if kimg.ctf is not None:
        _check_array("ctf", kimg.ctf, np.float32, (n_img, n_s), xp)
    n = poses.shape[0] if getattr(poses, "ndim", 0) == 2 else -1
    _check_array("poses", poses, np.float64, (n, 5), xp)
    _check_array("image_index", image_index, np.int64, (n,), xp)
    if out is None:
        out = xp.empty((n, 2), dtype=np.float64)
    _check_array("out", out, np.float64, (n, 2), xp)
    # the range check reads the indices back to the host (a sync on the GPU): callers whose indices are valid by
    # construction (the simplex's owners) pass check_index=False and keep the inner loop free of transfers
    if check_index and n and (int(image_index.min()) < 0 or int(image_index.max()) >= n_img):
        raise ValueError(f"image_index out of range [0, {n_img}): {int(image_index.min())}..{int(image_index.max())}")
    ctf = kimg.ctf if kimg.ctf is not None else kimg.weights         # not read when has_ctf = 0
    backend.kernels.launch("score", f"score_{INTERP_ENTRY[kref.kind]}", n, [
        kref.data, np.int32(kref.N), np.int32(kref.halo), np.int32(kref.extent), np.int32(kref.taps),
        kref.window, np.int32(kref.window.shape[0] - 1), kimg.freqs, kimg.weights, np.int32(n_s),
        np.int32(kimg.k_index), kimg.data, ctf, np.int32(kimg.ctf is not None), poses, image_index, np.int64(n),
        out], shared_mem=phase_table_bytes(kimg.k_index))
    return out


def score_kernel(backend, ref, prepared, poses, image_index=None, *, check_index: bool = True):
    """Normalised correlation per (image, pose) pair through kernels/score.cu (score.py's formula).

    ref : PreparedReference or :class:`KernelReference`; prepared : PreparedImages or :class:`KernelImages`
    (convert once with :func:`kernel_reference` / :func:`kernel_images` when calling repeatedly).
    poses : (n, 5) phi theta psi (degrees) sx sy (pixels); image_index : (n,) ints or None (pose i <-> image i).
    Returns float64 (n,) backend array, in [-1, 1]; 0 where the projection has no power.
    """
    xp = backend.xp
    kref = ref if isinstance(ref, KernelReference) else kernel_reference(backend, ref)
    kimg = prepared if isinstance(prepared, KernelImages) else kernel_images(backend, prepared)
    p = xp.ascontiguousarray(xp.asarray(poses, dtype=np.float64).reshape(-1, 5))
    if image_index is None:
        if p.shape[0] != len(kimg):
            raise ValueError(f"{p.shape[0]} poses for {len(kimg)} images: give image_index to pair them")
        idx = xp.arange(p.shape[0], dtype=np.int64)
    else:
        idx = xp.ascontiguousarray(xp.asarray(image_index, dtype=np.int64))
    sums = score_sums(backend, kref, kimg, p, idx, check_index=check_index)
    den = xp.sqrt(kimg.power[idx] * sums[:, 1])
    return xp.where(den > 0, sums[:, 0] / xp.where(den > 0, den, 1.0), 0.0)


def check_kernel_inputs(kref: KernelReference, kimg: KernelImages, xp) -> None:
    """The launch-wrapper checks of a reference and images that go to the objective's kernels together
    (kernels/score.cuh: score.cu, align.cu): one N, samples within the reference's crop, every array's dtype,
    shape and C order (TypeError / ValueError naming the array)."""
    if kref.N != kimg.N:
        raise ValueError(f"reference N={kref.N} but images N={kimg.N}; prepare both with the same box and pad")
    if kimg.k_reach > kref.extent:
        raise ValueError(f"the images have samples up to |k| = {kimg.k_reach:.2f} but the reference was cropped to "
                         f"{kref.extent}; convert it with kernel_reference(..., kmax=prepared.kmax)")
    if kimg.k_index > SCORE_MAX_K:
        raise ValueError(f"samples up to |k| = {kimg.k_index} exceed the kernels' {SCORE_MAX_K} (padded-grid "
                         f"units); lower the resolution limit or the padding")
    n_img, n_s = kimg.data.shape
    d, dx = 2 * kref.extent + 2 * kref.halo + 1, kref.extent + 1 + 2 * kref.halo
    _check_array("ref.data", kref.data, np.complex64, (d, d, dx), xp)
    _check_array("ref.window", kref.window, np.float32, (kref.window.shape[0],), xp)
    _check_array("freqs", kimg.freqs, np.float32, (n_s, 2), xp)
    _check_array("weights", kimg.weights, np.float32, (n_s,), xp)
    _check_array("data", kimg.data, np.complex64, (n_img, n_s), xp)
    _check_array("power", kimg.power, np.float64, (n_img,), xp)
    if kimg.ctf is not None:
        _check_array("ctf", kimg.ctf, np.float32, (n_img, n_s), xp)


# ----------------------------------------------------------------------------------------------- helpers
def _check_array(name, a, dtype, shape, xp) -> None:
    """Launch-wrapper checks: array of the backend's module, exact dtype (no silent casts), shape, C order."""
    if not isinstance(a, xp.ndarray):
        raise TypeError(f"{name} must be a {xp.__name__} array on this backend; got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype).name}; got {a.dtype} (convert once, e.g. with "
                        "kernel_reference / kernel_images)")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}; expected {tuple(shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (xp.ascontiguousarray)")


def _inline(path: Path, folder: Path, seen: set) -> str:
    seen.add(path.name)

    def include(match: re.Match) -> str:
        header = match.group(1)
        if header in seen:
            return f"// {header} already inlined"
        hpath = folder / header
        if not hpath.is_file():
            raise FileNotFoundError(f"{path.name} includes {header!r}, which is not in {folder}")
        return f'#line 1 "{header}"\n{_inline(hpath, folder, seen)}\n'

    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        m = _INCLUDE.match(line)
        if m:
            out.append(include(m))
            out.append(f'#line {lineno + 1} "{path.name}"')
        else:
            out.append(line)
    return "\n".join(out)


def _make_cache_dir(folder: Path) -> None:
    """Create ``folder`` and its missing parents with :data:`CACHE_DIR_MODE` whatever the umask (folders that exist
    are left as they are), so every user can reach the libraries cached there."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:    # made meanwhile by a concurrent build: its creator set the mode
            continue
        os.chmod(d, CACHE_DIR_MODE)


@lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    proc = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return f"{cxx}\n{proc.stdout}"


@lru_cache(maxsize=None)
def _load_cdll(path: str) -> ctypes.CDLL:
    return ctypes.CDLL(path)          # keyed by the content-hash path: one load per build


@lru_cache(maxsize=None)
def _cpu_function(module: str, kernel: str, kernel_dir):
    fn = getattr(cpu_build(module, kernel_dir), kernel)
    fn.restype = None
    return fn


@lru_cache(maxsize=None)
def _gpu_function(module: str, kernel: str, kernel_dir):
    return gpu_module(module, kernel_dir).get_function(kernel)


def _ctypes_arg(a):
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:
            raise ValueError("kernel arrays must be C-contiguous")
        return ctypes.c_void_p(a.ctypes.data)
    if isinstance(a, np.int32):
        return ctypes.c_int32(int(a))
    if isinstance(a, np.int64):
        return ctypes.c_int64(int(a))
    if isinstance(a, np.float32):
        return ctypes.c_float(float(a))
    if isinstance(a, np.float64):
        return ctypes.c_double(float(a))
    raise TypeError(f"kernel argument of type {type(a).__name__}: pass a numpy array or a numpy scalar "
                    "(np.int32, np.int64, np.float32, np.float64)")
