"""In-process MPI tests (pytest-mpi): run under `mpirun -n P python -m pytest --with-mpi -m mpi tests/parallel`."""
import argparse
import os
import tempfile

import numpy as np
import pytest


def _comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture(scope="module")
def dataset(shared_dir):
    comm = _comm()
    path = None
    if comm.rank == 0:
        from mpi_em.simulate import phantom, simulate_particles, write_dataset
        d = tempfile.mkdtemp(dir=shared_dir)
        vol = phantom(32, seed=4)
        sim = simulate_particles(vol, 301, 4.0, snr=1.0, seed=5, max_shift=2.0)
        path = write_dataset(d, vol, sim, 4.0, per_stack=120)
    return comm.bcast(path, root=0)


def _args(star, out, **kw):
    ns = argparse.Namespace(input=star, output=out, sym="C1", batch=50, r_max=None, pad=2, device="cpu",
                            seed=0, no_ctf=False)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


@pytest.mark.mpi(min_size=2)
def test_world_equals_self(dataset, shared_dir):
    """The P-rank reconstruction equals the 1-rank one (every P the suite runs with: 2 and 3, uneven)."""
    import mrcfile
    from mpi4py import MPI

    from mpi_em.jobs import reconstruct

    comm = _comm()
    outs = comm.bcast(tempfile.mkdtemp(dir=shared_dir) if comm.rank == 0 else None, root=0)
    reconstruct.run(_args(dataset, os.path.join(outs, "world")), comm)
    if comm.rank == 0:
        reconstruct.run(_args(dataset, os.path.join(outs, "self")), MPI.COMM_SELF)
        for name in ("half1", "half2", "map"):
            a = mrcfile.read(os.path.join(outs, "world", f"{name}.mrc"))
            b = mrcfile.read(os.path.join(outs, "self", f"{name}.mrc"))
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), name
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_failure_on_one_rank_reaches_every_rank():
    from mpi_em.distributed import RankFailed, collective_step

    comm = _comm()

    def step():
        if comm.rank == 1:
            raise ValueError("injected failure on rank 1")
        return comm.rank

    with pytest.raises(RankFailed) as e:
        collective_step(comm, step)
    assert "rank 1: ValueError: injected failure on rank 1" in str(e.value)


@pytest.mark.mpi(min_size=2)
def test_background_write_failure_stops_every_rank():
    """The EM jobs' outputs are written in the background (a forked process) on rank 0 while every rank
    computes on; the next
    root_step(comm, writer.wait) turns a failed write into a clean stop of every rank, with the write's error."""
    import time

    from mpi_em.distributed import RankFailed, root_step
    from mpi_em.io import BackgroundWriter

    comm = _comm()
    writer = BackgroundWriter() if comm.rank == 0 else None

    def failing_write():
        time.sleep(0.2)   # still running when the other ranks reach the collective
        raise OSError("No space left on device: run_it002_data.star")

    if writer:
        writer.submit(failing_write)
    with pytest.raises(RankFailed) as e:
        root_step(comm, writer.wait if writer else None)
    assert "No space left on device: run_it002_data.star" in str(e.value)
    if writer:
        writer.submit(lambda: None)   # the writer is usable again
        root_step(comm, writer.wait)
        writer.close()
    else:
        root_step(comm, None)


@pytest.mark.mpi(min_size=2)
def test_plan_is_balanced_and_complete(dataset):
    from mpi_em.distributed import make_plan
    from mpi_em.io import read_particles

    comm = _comm()
    star = read_particles(dataset)
    plans = make_plan(star, comm.size)
    rows = np.concatenate([p["row"] for p in plans])
    assert np.array_equal(np.sort(rows), np.arange(star.n))
    sizes = [len(p["row"]) for p in plans]
    assert max(sizes) - min(sizes) <= 1
    # every rank reads whole blocks of stacks: within a plan, the stack changes at most (#stacks - 1) times
    for p in plans:
        assert (p["stack"][1:] != p["stack"][:-1]).sum() <= len(set(star.stack)) - 1
