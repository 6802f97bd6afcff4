"""gpu_ali3d.parallel without an MPI launcher: the serial stand-in, particle blocks, fixed-order sums, errors.

The same functions under mpiexec with 2 and 3 ranks are tested in test_mpi.py.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from gpu_ali3d import parallel
from gpu_ali3d.reconstruct import accumulate_halves, add, finish, new_accumulator, reconstruct_halves


@pytest.fixture
def no_launcher(monkeypatch):
    for name in parallel._LAUNCHER_HINT_VARS + parallel._LOCAL_RANK_VARS:
        monkeypatch.delenv(name, raising=False)


def test_world_is_serial_outside_a_launcher(no_launcher, monkeypatch):
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    comm = parallel.world()
    assert isinstance(comm, parallel.SerialComm)
    assert (comm.rank, comm.size, comm.local_rank()) == (0, 1, 0)
    assert comm.bcast("x") == "x" and comm.gather(3) == [3] and comm.allgather(4) == [4]
    comm.barrier()
    with pytest.raises(SystemExit):
        comm.abort(2)


def test_launcher_without_mpi4py_is_an_error(no_launcher, monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)          # import mpi4py raises ImportError
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    with pytest.raises(RuntimeError, match="2 processes, but mpi4py does not import"):
        parallel.world()
    monkeypatch.setenv("PMI_SIZE", "1")                        # a one-process launch runs serially
    assert isinstance(parallel.world(), parallel.SerialComm)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 400, 401])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_blocks_are_contiguous_and_cover_every_particle_once(n, size):
    blocks = [parallel.block(n, r, size) for r in range(size)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(blocks[r][1] == blocks[r + 1][0] for r in range(size - 1))
    sizes = [e - s for s, e in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_blocks_round_as_sparx_mpi_start_end():
    # SPARX: int(round(float(nima) / nproc * myid)), Python 2 rounding (halves away from zero)
    assert [parallel.block(10, r, 4) for r in range(4)] == [(0, 3), (3, 5), (5, 8), (8, 10)]


def test_block_rejects_bad_ranks():
    with pytest.raises(ValueError, match="0 <= rank < size"):
        parallel.block(10, 3, 3)
    with pytest.raises(ValueError, match="number of particles"):
        parallel.block(-1, 0, 1)


def test_serial_reductions_are_the_array(rng):
    comm = parallel.SerialComm()
    a = rng.normal(size=(4, 5, 3))
    c = a + 1j * rng.normal(size=a.shape)
    out = parallel.reduce_sum_f64(a, comm)
    np.testing.assert_array_equal(out, a)
    assert out is not a
    np.testing.assert_array_equal(parallel.reduce_sum_f64(c, comm), c)
    np.testing.assert_array_equal(parallel.allreduce_sum_f64(c, comm), c)
    assert parallel.bcast_array(a, comm) is a
    with pytest.raises(TypeError, match="float64 or complex128"):
        parallel.reduce_sum_f64(a.astype(np.float32), comm)


def test_on_root_and_abort_on_error_pass_serial_exceptions_through():
    comm = parallel.SerialComm()
    assert parallel.on_root(comm, lambda: 5) == 5
    with pytest.raises(FileExistsError, match="exists"):
        with parallel.abort_on_error(comm):
            parallel.on_root(comm, lambda: (_ for _ in ()).throw(FileExistsError("out: exists")))


def test_serial_accumulators_reduce_to_themselves_and_finish_as_reconstruct_halves(rng):
    # refine._reference now finishes accumulate_halves' accumulators itself: the same bits as reconstruct_halves
    images = rng.normal(size=(6, 12, 12))
    poses = np.column_stack([rng.uniform(0, 360, 6), rng.uniform(0, 180, 6), rng.uniform(0, 360, 6),
                             rng.normal(0, 1, (6, 2))])
    accs = [parallel.reduce_accumulator(a, parallel.SerialComm()) for a in accumulate_halves(images, poses)]
    maps = reconstruct_halves(images, poses)
    for got, want in zip((finish(accs[0]), finish(accs[1]), finish(add(*accs))), maps):
        np.testing.assert_array_equal(got, want)


def test_select_device_ignores_cpu_backends():
    assert parallel.select_device(None, parallel.SerialComm()) is None
    assert new_accumulator(4).data.dtype == np.complex128      # what reduce_sum_f64 is given
