"""A strict, numpy-backed stand-in for the part of CuPy that gpu-ali3d uses, and the counts of what a GPU would pay.

DESIGN.md principle 6: the GPU host path runs in CI, on machines without a GPU, over this module. It behaves like
CuPy at the host/device boundary and counts what crosses it::

    xp = make_standin()                                   # one "cupy" with its own counts and devices
    backend = gpu_ali3d.backend.make_standin_backend(xp)  # a "gpu" Backend: this xp, the CPU kernel build
    before = xp.counts.snapshot()
    ...                                                   # host code, written against backend.xp
    used = xp.counts - before                             # launches, syncs, h2d_bytes, d2h_bytes, mixing_errors

Device arrays (:class:`ndarray`) wrap a numpy array (their "device memory"). As in CuPy:

* ``np.asarray(d)``, ``np.array(d)`` (``__array__``) raise TypeError ("Implicit conversion to a NumPy array is
  not allowed"); copies to the host are explicit: ``xp.asnumpy(d)``, ``d.get()``.
* Operands must be device arrays (of the current device), Python scalars or numpy scalars (``np.float64(1)``).
  A numpy ndarray (0-d included), a list or another object as an operand raises TypeError: ufunc-style
  functions, operators, ``where``, ``concatenate``, indices, values assigned by ``d[...] = v`` and kernel
  arguments alike. Each refusal adds one to ``mixing_errors`` (and an array of another device, ValueError).
* Results are device arrays, also where numpy gives a scalar: ``d.sum()`` and ``d[0]`` are 0-d device arrays.

What is counted (:class:`Counts`), one event per call, approximating what CuPy does on a GPU:

* ``launches``: each elementwise operation (operator, ufunc, ``where``, ``clip``, ``astype``, ``copy``), each
  reduction (``sum``, ``min``, ``all``, ...), each fill (``zeros``, ``ones``, ``full``, ``arange``, assignment into
  a slice), each gather or scatter (integer-array index, ``concatenate``, ``stack``, ``repeat``), each FFT and each
  custom kernel through :class:`RawKernel`. Views (basic slicing, ``reshape`` of contiguous data, ``broadcast_to``,
  ``.T``, ``.real``) and ``empty`` are free, as in CuPy. CuPy sometimes launches more than one kernel for one call
  (a fused reduction, a scan); one call is one launch here, so the count is a lower bound that ranks code well.
* ``syncs``: each time the host waits for the device to learn a value: ``float(d)``, ``int(d)``, ``bool(d)``,
  ``d.item()``, ``d.tolist()``, ``repr(d)``, iteration over ``d`` (once per loop), ``asnumpy``/``get``; and the
  calls whose output size depends on data: ``nonzero``, ``flatnonzero``, ``argwhere``, ``unique``, boolean-mask
  indexing and boolean-mask assignment (CuPy counts the True entries on the host), ``bincount`` (two: CuPy checks
  ``min >= 0`` and reads ``max`` for the length).
* ``h2d_bytes`` (``h2d_copies``): bytes copied host -> device by ``asarray``/``array`` of host data, ``d.set``,
  a Python list used as an index. ``d2h_bytes`` (``d2h_copies``): bytes copied back (``asnumpy``, ``get``,
  scalar conversions).
* ``sites``: for each kind of event, a Counter of the user-code lines (``file:line function``, the first frame
  outside this module) that caused it, e.g. ``counts.top("sync")``; ``kernels``: launches per custom kernel name.
* ``device_bytes``: an estimate of the device memory traffic of the library launches (everything but the custom
  kernels): the bytes of a launch's array operands plus those of its result (a gather or a join: twice its
  result). ``fft_bytes``: the part of it that FFTs read and write (input plus output). A GPU's time for these
  launches is about ``device_bytes / HBM bandwidth`` (the FFTs: a few passes more; bench/bench_gpu_model.py).
* ``device_s``: seconds the host spent executing the device's work here (custom kernels, library operations, FFTs):
  a run's wall time minus this is its host-side time, which a GPU would not shorten. ``device_cpu_s``: the same
  in the calling thread's CPU time (``time.thread_time``), which other processes' load does not inflate.
* ``kernel_calls``: one entry per custom-kernel launch, ``(name, blocks, args)`` with each argument's
  ``(dtype.str, shape)`` (a device array) or value (a numpy scalar), from which a model derives the kernel's work
  (samples x evaluations, samples x images x mates, ...). ``fft_calls``: one entry per FFT, ``(function, input
  (dtype.str, shape), output (dtype.str, shape))``.

Deliberately stricter than CuPy (each a place where CuPy would silently copy or compute a wrong answer):
``d[...] = numpy_array`` and numpy-array indices are refused (CuPy copies them to the device implicitly: write
``xp.asarray`` where the copy is meant); a custom kernel refuses Python ``int``/``float`` arguments (CuPy passes
them as 64-bit values, which a kernel's ``int``/``float`` parameter misreads; pass ``np.int32`` etc.). Pickling a
device array is refused.

Devices: ``cuda.runtime.getDeviceCount()`` is ``n_devices`` (default 1); ``cuda.Device(i).use()`` makes device i
current and is recorded in ``devices_used``; arrays remember their device and are refused (ValueError, as CuPy)
by operations while another device is current. ``cuda.runtime.memGetInfo()`` reports ``memory_bytes`` minus the
bytes of the live device arrays.

Custom kernels: :class:`RawModule` takes the same ``code`` and ``options`` as ``cupy.RawModule`` (what
:func:`gpu_ali3d.kernels.gpu_module` would compile with NVRTC: the inlined source and
the module's :func:`gpu_ali3d.kernels.nvrtc_options`; both are kept on the module to check) and runs the CPU build of that same
source (:func:`gpu_ali3d.kernels.cpu_build`, the content-hash cache the CPU backend uses). ``fn(grid, block, args)``
checks the launch configuration, unwraps device arrays to their buffers and calls the OpenMP build: one launch.
:class:`StandinKernelSet` is :class:`gpu_ali3d.kernels.KernelSet`'s GPU launch path over it.

Nothing is global: every :func:`make_standin` is a fresh module with its own counts and devices.

A whole refinement: :func:`profile_local_ali3d` runs ``local_ali3d(..., device="gpu")`` over a stand-in (while
:func:`serving_gpu` makes ``make_backend("gpu")`` return it) and cuts its counts per iteration and per alignment
(tests/test_gpu_budget.py asserts budgets on them; bench/bench_gpu_model.py turns them into a GPU time).
"""
from __future__ import annotations

import copy as _copy
import os
import sys
import tempfile
import time
import types
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import kernels as _kernels

#: Python and numpy scalars: allowed as operands, as in CuPy.
_SCALARS = (bool, int, float, complex, np.generic)
_HERE = os.path.abspath(__file__)
_NUMPY_DIR = os.path.dirname(np.__file__)
#: Frames skipped when a call site is recorded: this module, and Backend.to_host (report who asked for the copy).
_PASS_THROUGH = (_HERE, os.path.join(os.path.dirname(_HERE), "backend.py"))
_KINDS = ("launch", "sync", "h2d", "d2h", "mixing")


# ----------------------------------------------------------------------------------------------------- counts
@dataclass
class Counts:
    """What the GPU would pay: kernel launches, host syncs, host<->device copies, refused mixes (module docstring).

    ``snapshot()`` copies; ``counts - snapshot`` is what happened since; ``reset()`` zeroes in place.
    sites : kind ("launch", "sync", "h2d", "d2h", "mixing") -> Counter of call sites (h2d/d2h: bytes).
    kernels : custom kernel name -> launches. kernel_calls : (name, blocks, argument (dtype, shape) or values) per
    launch. fft_calls : (function, input (dtype, shape), output (dtype, shape)) per FFT.
    """

    launches: int = 0
    syncs: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    h2d_copies: int = 0
    d2h_copies: int = 0
    mixing_errors: int = 0
    device_bytes: int = 0
    fft_bytes: int = 0
    device_s: float = 0.0
    device_cpu_s: float = 0.0
    sites: dict = field(default_factory=lambda: {k: Counter() for k in _KINDS})
    kernels: Counter = field(default_factory=Counter)
    kernel_calls: list = field(default_factory=list)
    fft_calls: list = field(default_factory=list)

    _SCALAR_FIELDS = ("launches", "syncs", "h2d_bytes", "d2h_bytes", "h2d_copies", "d2h_copies", "mixing_errors",
                      "device_bytes", "fft_bytes", "device_s", "device_cpu_s")

    def snapshot(self) -> "Counts":
        return _copy.deepcopy(self)

    def reset(self) -> None:
        fresh = Counts()
        for name in self._SCALAR_FIELDS + ("sites", "kernels", "kernel_calls", "fft_calls"):
            setattr(self, name, getattr(fresh, name))

    def __sub__(self, other: "Counts") -> "Counts":
        out = Counts(**{n: getattr(self, n) - getattr(other, n) for n in self._SCALAR_FIELDS})
        out.sites = {k: self.sites[k] - other.sites[k] for k in _KINDS}
        out.kernels = self.kernels - other.kernels
        out.kernel_calls = self.kernel_calls[len(other.kernel_calls):]     # other: an earlier snapshot of self
        out.fft_calls = self.fft_calls[len(other.fft_calls):]
        return out

    def top(self, kind: str = "sync", n: int = 5) -> list[tuple[str, int]]:
        """The n call sites that caused most events of ``kind``."""
        return self.sites[kind].most_common(n)

    def as_dict(self) -> dict:
        return {n: getattr(self, n) for n in self._SCALAR_FIELDS}

    def summary(self, n_sites: int = 3) -> str:
        """One line of totals, then the top sites of syncs and mixing errors."""
        lines = [" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.as_dict().items())]
        for kind in ("sync", "mixing"):
            for site, count in self.top(kind, n_sites):
                lines.append(f"  {kind:6s} {count:6d}  {site}")
        return "\n".join(lines)

    # events -------------------------------------------------------------------------------------------------
    def _event(self, kind: str, amount: int = 1) -> None:
        self.sites[kind][_site()] += amount


def _site() -> str:
    """The first frame outside this module, backend.py and numpy: ``folder/file.py:line function``."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename in _PASS_THROUGH or f.f_code.co_filename.startswith(_NUMPY_DIR)):
        f = f.f_back
    if f is None:
        return "?"
    p = Path(f.f_code.co_filename)
    return f"{p.parent.name}/{p.name}:{f.f_lineno} {f.f_code.co_name}"


# ----------------------------------------------------------------------------------------------------- arrays
class ndarray:  # noqa: N801 - the name CuPy gives it (host code writes isinstance(a, xp.ndarray))
    """A device array: a numpy array owned by one stand-in module and one of its devices (module docstring)."""

    __slots__ = ("_a", "_xp", "_device", "__weakref__")
    __array_priority__ = 100.0
    __hash__ = None

    def __init__(self, a: np.ndarray, xp: "Standin", device: int):
        self._a, self._xp, self._device = a, xp, device

    # metadata: free ----------------------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    device = property(lambda self: self._xp.cuda.Device(self._device))
    T = property(lambda self: self._view(self._a.T))
    real = property(lambda self: self._view(self._a.real) if self._a.dtype.kind == "c" else self)
    imag = property(lambda self: self._view(self._a.imag) if self._a.dtype.kind == "c"
                    else self._xp._launched(np.zeros_like(self._a)))

    def __len__(self) -> int:
        return len(self._a)

    def _view(self, a) -> "ndarray":
        return ndarray(a, self._xp, self._device)

    # the boundary -------------------------------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        self._xp._refuse("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                         "a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return self._xp._ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        space = self._xp.fft if func.__module__.endswith("fft") else self._xp
        impl = getattr(space, func.__name__, None)
        if not callable(impl):
            self._xp._refuse(f"numpy.{func.__name__} is not provided for device arrays by the stand-in")
        return impl(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        raise TypeError("stand-in device arrays do not pickle; copy to the host first (xp.asnumpy)")

    def get(self) -> np.ndarray:
        return self._xp.asnumpy(self)

    def set(self, arr) -> None:
        host = np.asarray(arr)
        if host.shape != self.shape:
            raise ValueError(f"set: shape {host.shape} does not match {self.shape}")
        self._xp._h2d(host.nbytes)
        self._a[...] = host

    def _to_scalar(self, convert):
        if self._a.size != 1:
            raise TypeError("only size-1 arrays can be converted to Python scalars")
        self._xp._sync(self._a.itemsize)
        return convert(self._a.reshape(-1)[0].item())

    def __bool__(self):
        return self._to_scalar(bool)

    def __float__(self):
        return self._to_scalar(float)

    def __int__(self):
        return self._to_scalar(int)

    def __complex__(self):
        return self._to_scalar(complex)

    def __index__(self):
        if self._a.dtype.kind not in "iub":
            raise TypeError("only integer arrays can be used as an index")
        return self._to_scalar(int)

    def item(self):
        return self._to_scalar(lambda v: v)

    def tolist(self):
        self._xp._sync(self._a.nbytes)
        return self._a.tolist()

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        self._xp._sync(0)                  # a host loop over device elements: counted once per loop
        return (self[i] for i in range(len(self._a)))

    def __repr__(self):
        self._xp._sync(self._a.nbytes)
        return f"standin.{np.array_repr(self._a)}"

    __str__ = __repr__

    def __format__(self, spec):
        self._xp._sync(self._a.nbytes)
        return format(self._a.item() if self._a.size == 1 else self._a, spec)

    def __contains__(self, value):
        return bool((self == value).any())

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    # indexing -----------------------------------------------------------------------------------------------
    def __getitem__(self, key):
        key, advanced, masked = self._xp._index(key)
        out = self._a[key]
        if advanced:
            self._xp._launch(nbytes=2 * out.nbytes)
            if masked:
                self._xp._sync(0)
            return self._xp._wrap(out)
        if not isinstance(out, np.ndarray):         # every axis indexed by an int: a 0-d view, as in CuPy
            out = self._a[(key if isinstance(key, tuple) else (key,)) + (Ellipsis,)]
        return self._view(out)

    def __setitem__(self, key, value):
        xp = self._xp
        xp._check_device(self)
        key, _advanced, masked = xp._index(key)
        value = xp._operand(value)
        region = self._a[key] if not _advanced else value
        xp._launch(nbytes=np.asarray(region).nbytes + (value.nbytes if isinstance(value, np.ndarray) else 0))
        if masked:
            xp._sync(0)
        self._a[key] = value

    # methods ------------------------------------------------------------------------------------------------
    def astype(self, dtype, copy=True, **kwargs):
        if not copy and np.dtype(dtype) == self._a.dtype:
            return self
        return self._xp._call(lambda a: a.astype(dtype, **kwargs), self)

    def copy(self, order="C"):
        return self._xp._call(lambda a: a.copy(order=order), self)

    def reshape(self, *shape, order="C"):
        return self._xp.reshape(self, shape[0] if len(shape) == 1 else shape, order=order)

    def ravel(self, order="C"):
        return self._xp.ravel(self, order=order)

    def flatten(self):
        return self.copy().reshape(-1)

    def view(self, dtype=None):
        return self._view(self._a.view() if dtype is None else self._a.view(dtype))

    def transpose(self, *axes):
        return self._view(self._a.transpose(*axes))

    def squeeze(self, axis=None):
        return self._view(self._a.squeeze(axis))

    def fill(self, value):
        self[...] = value

    def conj(self):
        return self._xp.conj(self)

    conjugate = conj

    def nonzero(self):
        return self._xp.nonzero(self)

    def sum(self, *args, **kwargs):
        return self._xp._call(lambda a: a.sum(*args, **kwargs), self)

    def mean(self, *args, **kwargs):
        return self._xp._call(lambda a: a.mean(*args, **kwargs), self)

    def prod(self, *args, **kwargs):
        return self._xp._call(lambda a: a.prod(*args, **kwargs), self)

    def min(self, *args, **kwargs):
        return self._xp._call(lambda a: a.min(*args, **kwargs), self)

    def max(self, *args, **kwargs):
        return self._xp._call(lambda a: a.max(*args, **kwargs), self)

    def argmin(self, *args, **kwargs):
        return self._xp._call(lambda a: a.argmin(*args, **kwargs), self)

    def argmax(self, *args, **kwargs):
        return self._xp._call(lambda a: a.argmax(*args, **kwargs), self)

    def all(self, *args, **kwargs):
        return self._xp._call(lambda a: a.all(*args, **kwargs), self)

    def any(self, *args, **kwargs):
        return self._xp._call(lambda a: a.any(*args, **kwargs), self)

    def cumsum(self, *args, **kwargs):
        return self._xp._call(lambda a: a.cumsum(*args, **kwargs), self)


def _binary(ufunc):
    def op(self, other):
        return self._xp._ufunc(ufunc, "__call__", (self, other), {})

    def rop(self, other):
        return self._xp._ufunc(ufunc, "__call__", (other, self), {})

    def iop(self, other):
        self._xp._ufunc(ufunc, "__call__", (self, other), {"out": (self,)})
        return self
    return op, rop, iop


for _name, _uf in [("add", np.add), ("sub", np.subtract), ("mul", np.multiply), ("truediv", np.true_divide),
                   ("floordiv", np.floor_divide), ("mod", np.remainder), ("pow", np.power),
                   ("matmul", np.matmul), ("and", np.bitwise_and), ("or", np.bitwise_or),
                   ("xor", np.bitwise_xor), ("lshift", np.left_shift), ("rshift", np.right_shift)]:
    _op, _rop, _iop = _binary(_uf)
    setattr(ndarray, f"__{_name}__", _op)
    setattr(ndarray, f"__r{_name}__", _rop)
    setattr(ndarray, f"__i{_name}__", _iop)
for _name, _uf in [("eq", np.equal), ("ne", np.not_equal), ("lt", np.less), ("le", np.less_equal),
                   ("gt", np.greater), ("ge", np.greater_equal)]:
    setattr(ndarray, f"__{_name}__", _binary(_uf)[0])
for _name, _uf in [("neg", np.negative), ("pos", np.positive), ("abs", np.absolute), ("invert", np.invert)]:
    setattr(ndarray, f"__{_name}__", lambda self, _uf=_uf: self._xp._ufunc(_uf, "__call__", (self,), {}))


# ----------------------------------------------------------------------------------------------------- kernels
class RawModule:
    """``cupy.RawModule(code=..., options=...)`` over the CPU build of the same source (module docstring).

    code, options : kept as given (what NVRTC would compile on a GPU). The CPU build is made (or found in the
    content-hash cache) at ``compile()`` or the first ``get_function``.
    """

    def __init__(self, xp: "Standin", code: str, options=()):
        if not isinstance(code, str) or not code:
            raise TypeError("RawModule needs the kernel source as code=str")
        self._xp, self.code, self.options = xp, code, tuple(options)
        self._lib = None

    def compile(self):
        if self._lib is None:
            with tempfile.TemporaryDirectory(prefix="standin-") as tmp:
                # the same text and flags (fused where NVRTC may fuse), so the same build key and cached library
                # as the CPU backend's build of it
                (Path(tmp) / "module.cu").write_text(self.code)
                self._lib = _kernels.cpu_build("module", tmp, fast="--fmad=true" in self.options)
        return self

    def get_function(self, name: str) -> "RawKernel":
        self.compile()
        try:
            fn = getattr(self._lib, name)
        except AttributeError:
            raise RuntimeError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name!r}") from None
        fn.restype = None
        return RawKernel(self._xp, name, fn)


class RawKernel:
    """A kernel of a :class:`RawModule`: ``kernel(grid, block, args, shared_mem=0)``, one launch each call."""

    MAX_THREADS = 1024
    MAX_GRID = (2**31 - 1, 65535, 65535)
    MAX_SHARED = 48 * 1024

    def __init__(self, xp: "Standin", name: str, fn):
        self._xp, self.name, self._fn = xp, name, fn

    def __call__(self, grid, block, args, *, shared_mem: int = 0):
        xp = self._xp
        grid, block = _dims("grid", grid), _dims("block", block)
        if any(g > m for g, m in zip(grid, self.MAX_GRID)):
            raise ValueError(f"{self.name}: grid {grid} exceeds the CUDA limits {self.MAX_GRID}")
        if int(np.prod(block)) > self.MAX_THREADS or block[0] % 32:
            raise ValueError(f"{self.name}: block {block}: at most {self.MAX_THREADS} threads, a multiple of 32 "
                             "in x (block_sum needs whole warps)")
        if not 0 <= int(shared_mem) <= self.MAX_SHARED:
            raise ValueError(f"{self.name}: shared_mem={shared_mem} outside 0..{self.MAX_SHARED}")
        if not isinstance(args, tuple):
            raise TypeError(f"{self.name}: args must be a tuple (as cupy.RawKernel takes them)")
        c_args = []
        for i, a in enumerate(args):
            if isinstance(a, ndarray):
                xp._check_device(a)
                c_args.append(_kernels._ctypes_arg(a._a))
            elif isinstance(a, np.ndarray):
                xp._refuse(f"{self.name}: argument {i} is a numpy array (a host pointer would crash the GPU "
                           "kernel); copy it to the device with xp.asarray")
            elif isinstance(a, (np.int32, np.int64, np.float32, np.float64)):
                c_args.append(_kernels._ctypes_arg(a))
            else:
                xp._refuse(f"{self.name}: argument {i} of type {type(a).__name__}: pass device arrays and numpy "
                           "scalars whose type is the C parameter's (np.int32, np.int64, np.float32, np.float64)")
        xp._launch()
        xp.counts.kernels[self.name] += 1
        xp.counts.kernel_calls.append((self.name, int(np.prod(grid)), tuple(
            (a.dtype.str, tuple(a.shape)) if isinstance(a, ndarray) else a.item() for a in args)))
        t0, c0 = time.perf_counter(), time.thread_time()
        self._fn(*c_args)
        xp._timed(t0, c0)


def _dims(what, dims) -> tuple:
    dims = (dims,) if isinstance(dims, (int, np.integer)) else tuple(dims)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) and d >= 1 for d in dims):
        raise ValueError(f"{what}={dims!r}: 1 to 3 positive integers")
    return tuple(int(d) for d in dims)


@dataclass(frozen=True)
class StandinKernelSet(_kernels.KernelSet):
    """:class:`gpu_ali3d.kernels.KernelSet` with target "gpu" whose RawModules come from a stand-in ``xp``.

    load / launch do what KernelSet's GPU branch does (the inlined source with nvrtc_options into a RawModule,
    compiled eagerly at load; grid ``min(n_blocks, GPU_MAX_BLOCKS)`` blocks of GPU_THREADS), over ``xp.RawModule``.
    """

    xp: object = field(default=None, compare=False)

    def module(self, name: str) -> RawModule:
        key = (name, self.kernel_dir)
        modules = self.xp._raw_modules
        if key not in modules:
            modules[key] = self.xp.RawModule(code=_kernels.kernel_source(name, self.kernel_dir),
                                             options=_kernels.nvrtc_options(name)).compile()
        return modules[key]

    def load(self, module: str) -> None:
        self.module(module)

    def launch(self, module: str, kernel: str, n_blocks: int, args, shared_mem: int = 0) -> None:
        if n_blocks <= 0:
            return
        fn = self.module(module).get_function(kernel)
        fn((int(min(n_blocks, _kernels.GPU_MAX_BLOCKS)),), (_kernels.GPU_THREADS,), tuple(args),
           shared_mem=int(shared_mem))


# ----------------------------------------------------------------------------------------------------- module
class _Device:
    def __init__(self, xp: "Standin", device: int | None = None):
        self._xp = xp
        self.id = xp.current_device if device is None else int(device)
        if not 0 <= self.id < xp.n_devices:
            raise RuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {self.id} "
                               f"({xp.n_devices} stand-in devices)")
        self._previous = None

    def use(self) -> None:
        self._xp.current_device = self.id
        self._xp.devices_used.append(self.id)

    def synchronize(self) -> None:
        self._xp._sync(0)

    def __enter__(self):
        self._previous = self._xp.current_device
        self.use()
        return self

    def __exit__(self, *exc):
        self._xp.current_device = self._previous

    def __eq__(self, other):
        return isinstance(other, _Device) and other.id == self.id

    __hash__ = None

    def __repr__(self):
        return f"<stand-in CUDA Device {self.id}>"


class _MemoryPool:
    def __init__(self, xp):
        self._xp = xp

    def used_bytes(self) -> int:
        return self._xp._live_bytes()

    def total_bytes(self) -> int:
        return self._xp._live_bytes()

    def free_bytes(self) -> int:
        return 0

    def free_all_blocks(self) -> None:
        pass


class Standin(types.ModuleType):
    """One stand-in "cupy" module (:func:`make_standin`): functions, dtypes, ``fft``, ``cuda``, ``RawModule``."""

    ndarray = ndarray
    newaxis = None
    pi, e, inf, nan = np.pi, np.e, np.inf, np.nan
    bool_, int8, int16, int32, int64, uint8, uint32, uint64, intp = (np.bool_, np.int8, np.int16, np.int32,
                                                                      np.int64, np.uint8, np.uint32, np.uint64,
                                                                      np.intp)
    float16, float32, float64, complex64, complex128 = np.float16, np.float32, np.float64, np.complex64, np.complex128
    dtype = np.dtype

    def __init__(self, n_devices: int = 1, memory_bytes: int = 16 * 2**30):
        super().__init__("cupy_standin", "A strict numpy-backed stand-in for CuPy (gpu_ali3d.standin).")
        if n_devices < 0:
            raise ValueError(f"n_devices={n_devices} must be >= 0")
        self.n_devices, self.memory_bytes = int(n_devices), int(memory_bytes)
        self.current_device = 0
        self.devices_used: list[int] = []
        self.counts = Counts()
        self._raw_modules: dict = {}
        self._arrays = weakref.WeakValueDictionary()       # id -> live array owning its buffer
        self.fft = _FFT(self)
        self.cuda = _cuda_namespace(self)
        self.RawModule = lambda code, options=(), **kw: RawModule(self, code, options)

    # bookkeeping --------------------------------------------------------------------------------------------
    def _launch(self, n: int = 1, nbytes: int = 0, fft: bool = False) -> None:
        self.counts.launches += n
        self.counts._event("launch", n)
        self.counts.device_bytes += int(nbytes)
        if fft:
            self.counts.fft_bytes += int(nbytes)

    def _sync(self, d2h_bytes: int) -> None:
        self.counts.syncs += 1
        self.counts._event("sync")
        if d2h_bytes:
            self.counts.d2h_bytes += int(d2h_bytes)
            self.counts.d2h_copies += 1
            self.counts._event("d2h", int(d2h_bytes))

    def _timed(self, t0: float, c0: float) -> None:
        self.counts.device_s += time.perf_counter() - t0
        self.counts.device_cpu_s += time.thread_time() - c0

    def _h2d(self, nbytes: int) -> None:
        self.counts.h2d_bytes += int(nbytes)
        self.counts.h2d_copies += 1
        self.counts._event("h2d", int(nbytes))

    def _refuse(self, message: str, error=TypeError):
        self.counts.mixing_errors += 1
        self.counts._event("mixing")
        raise error(message)

    def _live_bytes(self) -> int:
        """Bytes of the live device arrays that own their memory (views are not counted again)."""
        return sum(arr._a.nbytes for arr in list(self._arrays.values()))

    def _wrap(self, out):
        """numpy results -> device arrays on the current device (scalars become 0-d arrays, as in CuPy)."""
        if isinstance(out, tuple):
            return tuple(self._wrap(o) for o in out)
        if isinstance(out, np.generic):
            out = np.asarray(out)
        if not isinstance(out, np.ndarray):
            return out
        arr = ndarray(out, self, self.current_device)
        if out.base is None:
            self._arrays[id(arr)] = arr
        return arr

    def _launched(self, out, in_bytes: int = 0, fft: bool = False):
        self._launch(nbytes=in_bytes + sum(o.nbytes for o in (out if isinstance(out, tuple) else (out,))
                                           if isinstance(o, (np.ndarray, np.generic))), fft=fft)
        return self._wrap(out)

    def _check_device(self, a: ndarray) -> None:
        if a._device != self.current_device:
            self._refuse(f"Array device must be same as the current device: array device = {a._device} while "
                         f"current = {self.current_device}", ValueError)

    def _operand(self, x):
        """A device array's buffer, or a Python/numpy scalar; anything else is refused as CuPy refuses it."""
        if isinstance(x, ndarray):
            self._check_device(x)
            return x._a
        if isinstance(x, _SCALARS):
            return x
        if isinstance(x, np.ndarray):
            self._refuse(f"Unsupported type {type(x)}: a numpy array cannot be an operand of a device array "
                         "(copy it explicitly with xp.asarray)")
        self._refuse(f"Unsupported type {type(x)}: operands are device arrays and Python or numpy scalars")

    def _index(self, key):
        """(numpy key, advanced, masked): device index arrays unwrapped; numpy arrays refused; lists copied."""
        parts = key if isinstance(key, tuple) else (key,)
        out, advanced, masked = [], False, False
        for k in parts:
            if isinstance(k, ndarray):
                self._check_device(k)
                advanced = True
                masked = masked or k.dtype == np.bool_
                out.append(k._a)
            elif isinstance(k, np.ndarray):
                self._refuse(f"a numpy array ({k.dtype}, shape {k.shape}) as an index of a device array; copy it "
                             "to the device with xp.asarray")
            elif isinstance(k, list):
                host = np.asarray(k)
                self._h2d(host.nbytes)
                advanced = True
                masked = masked or host.dtype == np.bool_
                out.append(host)
            else:
                out.append(k)
        return (tuple(out) if isinstance(key, tuple) else out[0]), advanced, masked

    def _call(self, fn, *arrays, fft: bool = False):
        """fn over the buffers of device arrays: one launch, device result."""
        buffers = [self._operand(a) for a in arrays]
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn(*buffers)
        self._timed(t0, c0)
        return self._launched(out, sum(b.nbytes for b in buffers if isinstance(b, np.ndarray)), fft=fft)

    def _ufunc(self, ufunc, method, inputs, kwargs):
        args = [self._operand(x) for x in inputs]
        out = kwargs.pop("out", None)
        if out is not None:
            out = out if isinstance(out, tuple) else (out,)
            if not all(isinstance(o, ndarray) for o in out):
                self._refuse("out= must be device arrays")
            for o in out:
                self._check_device(o)
            kwargs["out"] = tuple(o._a for o in out)
        t0, c0 = time.perf_counter(), time.thread_time()
        result = getattr(ufunc, method)(*args, **kwargs)
        self._timed(t0, c0)
        results = kwargs["out"] if out is not None else (result if isinstance(result, tuple) else (result,))
        self._launch(nbytes=sum(a.nbytes for a in list(args) + list(results) if isinstance(a, np.ndarray)))
        if out is not None:
            return out[0] if len(out) == 1 else out
        return self._wrap(result)

    def _arrays_in(self, seq, what):
        if isinstance(seq, (ndarray, np.ndarray)) or not isinstance(seq, (list, tuple)):
            self._refuse(f"{what} takes a sequence of device arrays")
        out = []
        for a in seq:
            if not isinstance(a, ndarray):
                self._refuse(f"{what}: only device arrays can be joined; got {type(a).__name__}")
            self._check_device(a)
            out.append(a._a)
        return out

    # host <-> device ----------------------------------------------------------------------------------------
    def asarray(self, a, dtype=None, order=None):
        if isinstance(a, ndarray):
            self._check_device(a)
            if dtype is not None and np.dtype(dtype) != a.dtype:
                return a.astype(dtype)
            return a
        return self.array(a, dtype=dtype, order=order)

    def array(self, a, dtype=None, copy=True, order=None):
        if isinstance(a, ndarray):
            return self.asarray(a, dtype) if not copy else self._call(lambda x: np.array(x, dtype=dtype), a)
        host = np.array(a, dtype=dtype, order="C" if order is None else order)
        if host.dtype.kind in "OUSV":
            raise TypeError(f"Unsupported dtype {host.dtype} for a device array")
        self._h2d(host.nbytes)
        return self._wrap(host)

    def asnumpy(self, a, out=None):
        if not isinstance(a, ndarray):
            return np.asarray(a)
        self._check_device(a)
        self._sync(a.nbytes)
        host = a._a.copy()
        if out is not None:
            out[...] = host
            return out
        return host

    def get_array_module(self, *args):
        return self if any(isinstance(a, ndarray) for a in args) else np

    def get_default_memory_pool(self):
        return _MemoryPool(self)

    # creation -----------------------------------------------------------------------------------------------
    def empty(self, shape, dtype=np.float64, order="C"):
        return self._wrap(np.empty(shape, dtype, order))

    def zeros(self, shape, dtype=np.float64, order="C"):
        return self._launched(np.zeros(shape, dtype, order))

    def ones(self, shape, dtype=np.float64, order="C"):
        return self._launched(np.ones(shape, dtype, order))

    def full(self, shape, fill_value, dtype=None, order="C"):
        return self._launched(np.full(shape, self._operand(fill_value), dtype, order))

    def empty_like(self, a, dtype=None):
        return self._wrap(np.empty_like(self._operand(a), dtype))

    def zeros_like(self, a, dtype=None):
        return self._call(lambda x: np.zeros_like(x, dtype), a)

    def ones_like(self, a, dtype=None):
        return self._call(lambda x: np.ones_like(x, dtype), a)

    def full_like(self, a, fill_value, dtype=None):
        return self._call(lambda x: np.full_like(x, self._operand(fill_value), dtype), a)

    def arange(self, *args, dtype=None):
        return self._launched(np.arange(*(self._operand(a) for a in args), dtype=dtype))

    def linspace(self, *args, **kwargs):
        return self._launched(np.linspace(*(self._operand(a) for a in args), **kwargs))

    # views and copies ---------------------------------------------------------------------------------------
    def _maybe_copy(self, a: ndarray, out: np.ndarray) -> ndarray:
        if np.may_share_memory(out, a._a):
            return a._view(out)
        return self._launched(out)

    def reshape(self, a, shape, order="C"):
        self._operand(a)
        return self._maybe_copy(a, a._a.reshape(shape, order=order))

    def ravel(self, a, order="C"):
        self._operand(a)
        return self._maybe_copy(a, a._a.ravel(order=order))

    def ascontiguousarray(self, a, dtype=None):
        a = self.asarray(a, dtype)
        return a if a.flags.c_contiguous else a.copy()

    def broadcast_to(self, a, shape):
        self._operand(a)
        return a._view(np.broadcast_to(a._a, shape))

    def expand_dims(self, a, axis):
        self._operand(a)
        return a._view(np.expand_dims(a._a, axis))

    def transpose(self, a, axes=None):
        self._operand(a)
        return a._view(np.transpose(a._a, axes))

    def moveaxis(self, a, source, destination):
        self._operand(a)
        return a._view(np.moveaxis(a._a, source, destination))

    def squeeze(self, a, axis=None):
        self._operand(a)
        return a._view(np.squeeze(a._a, axis))

    def copy(self, a, order="C"):
        return self._call(lambda x: x.copy(order=order), a)

    # joins, gathers, scans ----------------------------------------------------------------------------------
    def concatenate(self, arrays, axis=0, dtype=None):
        parts = self._arrays_in(arrays, "concatenate")
        return self._launched(np.concatenate(parts, axis=axis, dtype=dtype), sum(a.nbytes for a in parts))

    def stack(self, arrays, axis=0):
        parts = self._arrays_in(arrays, "stack")
        return self._launched(np.stack(parts, axis=axis), sum(a.nbytes for a in parts))

    def repeat(self, a, repeats, axis=None):
        return self._call(lambda x: np.repeat(x, repeats, axis), a)

    def tile(self, a, reps):
        return self._call(lambda x: np.tile(x, reps), a)

    def roll(self, a, shift, axis=None):
        return self._call(lambda x: np.roll(x, shift, axis), a)

    def take(self, a, indices, axis=None):
        return self._call(lambda x, i: np.take(x, i, axis), a, indices)

    def cumsum(self, a, axis=None, dtype=None):
        return self._call(lambda x: np.cumsum(x, axis, dtype), a)

    def sort(self, a, axis=-1):
        return self._call(lambda x: np.sort(x, axis), a)

    def argsort(self, a, axis=-1):
        return self._call(lambda x: np.argsort(x, axis), a)

    def searchsorted(self, a, v, side="left"):
        return self._call(lambda x, y: np.searchsorted(x, y, side), a, v)

    def einsum(self, subscripts, *operands, **kwargs):
        buffers = [self._operand(o) for o in operands]
        return self._launched(np.einsum(subscripts, *buffers, **kwargs),
                              sum(b.nbytes for b in buffers if isinstance(b, np.ndarray)))

    def dot(self, a, b):
        return self._call(np.dot, a, b)

    def where(self, condition, x=None, y=None):
        if x is None and y is None:
            return self.nonzero(condition)
        return self._call(np.where, condition, x, y)

    def clip(self, a, a_min, a_max):
        return self._call(np.clip, a, a_min, a_max)

    # data-dependent sizes: a sync each ----------------------------------------------------------------------
    def nonzero(self, a):
        out = self._call(np.nonzero, a)
        self._sync(0)
        return out

    def flatnonzero(self, a):
        out = self._call(np.flatnonzero, a)
        self._sync(0)
        return out

    def argwhere(self, a):
        out = self._call(np.argwhere, a)
        self._sync(0)
        return out

    def unique(self, a, **kwargs):
        out = self._call(lambda x: np.unique(x, **kwargs), a)
        self._sync(0)
        return out

    def bincount(self, x, weights=None, minlength=0):
        if not isinstance(x, ndarray):
            self._operand(x)
        self._sync(0)                              # CuPy: x.min() >= 0 checked on the host
        self._sync(0)                              # CuPy: int(x.max()) + 1 for the output length
        w = None if weights is None else self._operand(weights)
        return self._launched(np.bincount(self._operand(x), w, minlength))

    # reductions: one launch each ----------------------------------------------------------------------------
    def sum(self, a, axis=None, dtype=None, keepdims=False):
        return self._call(lambda x: np.sum(x, axis=axis, dtype=dtype, keepdims=keepdims), a)

    def mean(self, a, axis=None, dtype=None, keepdims=False):
        return self._call(lambda x: np.mean(x, axis=axis, dtype=dtype, keepdims=keepdims), a)

    def prod(self, a, axis=None, dtype=None, keepdims=False):
        return self._call(lambda x: np.prod(x, axis=axis, dtype=dtype, keepdims=keepdims), a)

    def min(self, a, axis=None, keepdims=False):
        return self._call(lambda x: np.min(x, axis=axis, keepdims=keepdims), a)

    def max(self, a, axis=None, keepdims=False):
        return self._call(lambda x: np.max(x, axis=axis, keepdims=keepdims), a)

    amin, amax = min, max

    def argmin(self, a, axis=None):
        return self._call(lambda x: np.argmin(x, axis=axis), a)

    def argmax(self, a, axis=None):
        return self._call(lambda x: np.argmax(x, axis=axis), a)

    def all(self, a, axis=None, keepdims=False):
        return self._call(lambda x: np.all(x, axis=axis, keepdims=keepdims), a)

    def any(self, a, axis=None, keepdims=False):
        return self._call(lambda x: np.any(x, axis=axis, keepdims=keepdims), a)

    def count_nonzero(self, a, axis=None):
        return self._call(lambda x: np.count_nonzero(x, axis=axis), a)

    def std(self, a, axis=None, ddof=0, keepdims=False):
        return self._call(lambda x: np.std(x, axis=axis, ddof=ddof, keepdims=keepdims), a)

    def var(self, a, axis=None, ddof=0, keepdims=False):
        return self._call(lambda x: np.var(x, axis=axis, ddof=ddof, keepdims=keepdims), a)


#: numpy ufuncs offered as functions of the stand-in module (one launch each; refusing numpy operands).
_UFUNCS = ("abs absolute sqrt square exp expm1 log log1p log2 log10 sin cos tan arcsin arccos arctan arctan2 "
           "sinh cosh tanh hypot floor ceil rint trunc sign isfinite isnan isinf maximum minimum fmax fmin add "
           "subtract multiply divide true_divide floor_divide remainder mod power negative conj conjugate "
           "logical_and logical_or logical_not logical_xor bitwise_and bitwise_or invert equal not_equal less "
           "less_equal greater greater_equal frexp ldexp deg2rad rad2deg radians degrees copysign").split()
for _name in _UFUNCS:
    _uf = getattr(np, _name, None)
    if isinstance(_uf, np.ufunc):
        setattr(Standin, _name, lambda self, *args, _uf=_uf, **kwargs: self._ufunc(_uf, "__call__", args, kwargs))


def _real(self, a):
    self._operand(a)
    return a.real


def _imag(self, a):
    self._operand(a)
    return a.imag


Standin.real, Standin.imag = _real, _imag


class _FFT:
    """``xp.fft``: scipy.fft on device buffers, one launch per call (single precision kept, as CuPy). scipy's,
    not numpy's, so that the stand-in's transforms are the CPU backend's bit for bit (the host path uses scipy.fft):
    what differs between the two runs is then only the host/device boundary."""

    def __init__(self, xp: Standin):
        import scipy.fft

        self._xp = xp
        for name in ("fft", "ifft", "fft2", "ifft2", "fftn", "ifftn", "rfft", "irfft", "rfft2", "irfft2", "rfftn",
                     "irfftn", "hfft", "ihfft"):
            setattr(self, name, lambda a, *args, _fn=getattr(scipy.fft, name), **kwargs: self._transform(
                _fn, a, args, kwargs))
        for name in ("fftshift", "ifftshift"):
            fn = getattr(scipy.fft, name)
            setattr(self, name, lambda a, *args, _fn=fn, **kwargs: xp._call(lambda x: _fn(x, *args, **kwargs), a))

    def _transform(self, fn, a, args, kwargs):
        out = self._xp._call(lambda x: fn(x, *args, **kwargs), a, fft=True)
        self._xp.counts.fft_calls.append((fn.__name__, (a.dtype.str, tuple(a.shape)),
                                          (out.dtype.str, tuple(out.shape))))
        return out

    def fftfreq(self, n, d=1.0):
        return self._xp._launched(np.fft.fftfreq(n, d))

    def rfftfreq(self, n, d=1.0):
        return self._xp._launched(np.fft.rfftfreq(n, d))


def _cuda_namespace(xp: Standin) -> types.SimpleNamespace:
    """``xp.cuda``: ``runtime`` (getDeviceCount, getDevice, memGetInfo, deviceSynchronize) and ``Device``."""
    def mem_get_info():
        return max(0, xp.memory_bytes - xp._live_bytes()), xp.memory_bytes

    runtime = types.SimpleNamespace(getDeviceCount=lambda: xp.n_devices, getDevice=lambda: xp.current_device,
                                    memGetInfo=mem_get_info, deviceSynchronize=lambda: xp._sync(0))
    return types.SimpleNamespace(runtime=runtime, Device=lambda device=None: _Device(xp, device))


def make_standin(n_devices: int = 1, memory_bytes: int = 16 * 2**30) -> Standin:
    """A fresh stand-in "cupy": ``n_devices`` devices of ``memory_bytes`` each, zeroed counts (module docstring)."""
    return Standin(n_devices=n_devices, memory_bytes=memory_bytes)


# ------------------------------------------------------------------------------------------ a refinement's counts
@contextmanager
def serving_gpu(xp: Standin):
    """While active, ``gpu_ali3d.backend.make_backend("gpu")`` returns a stand-in backend over ``xp``
    (:func:`gpu_ali3d.backend.make_standin_backend`), so ``local_ali3d(..., device="gpu")`` runs its GPU host path
    here; every other name is served as usual."""
    from . import backend as backend_module

    real = backend_module.make_backend

    def make_backend(name: str = "auto", *, kernel_dir=None):
        if name == "gpu":
            return backend_module.make_standin_backend(xp, kernel_dir=kernel_dir)
        return real(name, kernel_dir=kernel_dir)

    backend_module.make_backend = make_backend
    try:
        yield xp
    finally:
        backend_module.make_backend = real


@dataclass
class RefineProfile:
    """What :func:`profile_local_ali3d` measured: the run's result and its counts, cut where the work begins.

    setup : the counts before the first reconstruction (kernel loads, memory queries).
    iterations : one :class:`Counts` per reconstruction (per iteration and chunk: ``local_ali3d`` reconstructs,
        then aligns; the counts run from one reconstruction's start to the next one's, so the entry of an
        iteration holds its reconstructions, FSC, reference and alignment; the last entry, the final
        reconstruction, has no alignment). wall_s : the wall time of each. host_cpu_s : the calling thread's
        CPU time in each minus its ``device_cpu_s``: the host-side work, free of other processes' load.
    alignments : the counts of each ``alignment.align_poses`` call (one per iteration and chunk but the last),
        also contained in ``iterations``. batches : the alignment kernel's launches in each (one per batch; kernels
        of kernels/align.cu, whose names start with "align").
    devices_used : ``xp.devices_used`` at the end (the device each ``select_device`` made current).
    """

    result: object
    setup: Counts
    iterations: list
    wall_s: list
    host_cpu_s: list
    alignments: list
    batches: list
    devices_used: list


def profile_local_ali3d(stack, outdir, *, xp: Standin | None = None, **options) -> RefineProfile:
    """``local_ali3d(stack, outdir, device="gpu", progress=False, **options)`` on the stand-in ``xp`` (default a
    fresh one device :func:`make_standin`), with the counts cut per iteration and per alignment
    (:class:`RefineProfile`). The cuts wrap ``refine._reference`` and ``refine.align_poses`` for the duration of
    the call (restored after). Under mpiexec each rank profiles its own part."""
    from . import refine

    xp = make_standin() if xp is None else xp
    marks, alignments = [], []
    real_reference, real_align = refine._reference, refine.align_poses

    def reference(*args, **kwargs):
        marks.append((xp.counts.snapshot(), time.perf_counter(), time.thread_time()))
        return real_reference(*args, **kwargs)

    def align(*args, **kwargs):
        before = xp.counts.snapshot()
        out = real_align(*args, **kwargs)
        alignments.append(xp.counts - before)
        return out

    options.setdefault("progress", False)
    refine._reference, refine.align_poses = reference, align
    try:
        with serving_gpu(xp):
            result = refine.local_ali3d(stack, outdir, device="gpu", **options)
    finally:
        refine._reference, refine.align_poses = real_reference, real_align
    marks.append((xp.counts.snapshot(), time.perf_counter(), time.thread_time()))
    iterations = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    wall = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    host_cpu = [max(0.0, (b[2] - a[2]) - c.device_cpu_s) for a, b, c in zip(marks, marks[1:], iterations)]
    return RefineProfile(result=result, setup=marks[0][0] if marks else xp.counts.snapshot(), iterations=iterations,
                         wall_s=wall, host_cpu_s=host_cpu, alignments=alignments,
                         batches=[_align_launches(a) for a in alignments],
                         devices_used=list(xp.devices_used))


def _align_launches(counts: Counts) -> int:
    """Launches of kernels/align.cu's entry points (``align``, or one per interpolation: ``align_kb``, ...)."""
    return sum(v for name, v in counts.kernels.items() if name == "align" or name.startswith("align_"))
