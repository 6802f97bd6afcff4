"""The backend object: which array module (numpy or cupy) and which kernel build host code runs on.

Host code takes a :class:`Backend` argument and writes ``xp = backend.xp``; nothing picks a backend at import time.
cupy is imported here lazily, and only when a GPU backend is asked for (or probed by "auto").
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .kernels import KernelSet

BACKENDS = ("cpu", "gpu", "auto")


@dataclass(frozen=True)
class Backend:
    """name : "cpu" or "gpu". xp : numpy or cupy. kernels : :class:`gpu_ali3d.kernels.KernelSet` of that target."""

    name: str
    xp: ModuleType
    kernels: KernelSet

    def to_host(self, a) -> np.ndarray:
        """A numpy copy (GPU) or the array itself (CPU). Only at reduction and I/O boundaries."""
        return a if self.xp is np else self.xp.asnumpy(a)

    def free_memory_bytes(self) -> int | None:
        """Free memory of the GPU this process uses (cudaMemGetInfo plus what CuPy's pool holds unused); None on
        the CPU backend, whose arrays share the host memory that the callers budget for anyway."""
        if self.xp is np:
            return None
        free, _total = self.xp.cuda.runtime.memGetInfo()
        return int(free + self.xp.get_default_memory_pool().free_bytes())

    @property
    def counts(self):
        """On a stand-in backend (:func:`make_standin_backend`), its :class:`gpu_ali3d.standin.Counts`; else None."""
        from .standin import Standin
        return self.xp.counts if isinstance(self.xp, Standin) else None


def make_backend(name: str = "auto", *, kernel_dir=None) -> Backend:
    """name : "cpu", "gpu" (RuntimeError when no usable CUDA device) or "auto" (gpu if cupy imports and sees a
    device, else cpu). kernel_dir : kernel source folder (default the package's kernels/)."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}; expected one of {BACKENDS}")
    if name == "auto":
        name = "gpu" if gpu_available() else "cpu"
    if name == "cpu":
        return Backend("cpu", np, KernelSet("cpu", None if kernel_dir is None else str(kernel_dir)))
    cupy = _import_cupy()
    return Backend("gpu", cupy, KernelSet("gpu", None if kernel_dir is None else str(kernel_dir)))


def make_standin_backend(xp=None, *, kernel_dir=None) -> Backend:
    """A "gpu" Backend over the strict CuPy stand-in of the tests (:mod:`gpu_ali3d.standin`): ``xp`` from
    ``standin.make_standin()`` (default: a fresh one with one device), and the GPU launch path over the CPU build
    of the kernels. Never chosen by :func:`make_backend`; tests build it explicitly."""
    from . import standin
    xp = standin.make_standin() if xp is None else xp
    return Backend("gpu", xp, standin.StandinKernelSet("gpu", None if kernel_dir is None else str(kernel_dir), xp))


def gpu_available() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _import_cupy():
    try:
        import cupy
    except ImportError as err:
        raise RuntimeError("backend 'gpu' needs cupy: pip install 'gpu-ali3d[cuda12]' (or [cuda13]); "
                           "or use --device cpu") from err
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:
        raise RuntimeError(f"backend 'gpu': cupy cannot reach a CUDA device ({err}); use --device cpu") from err
    if n < 1:
        raise RuntimeError("backend 'gpu': no CUDA device is visible; use --device cpu")
    return cupy
