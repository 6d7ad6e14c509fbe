"""Fixtures of the in-process MPI tests (every rank runs the same tests in the same order)."""
import shutil
import tempfile

import pytest


@pytest.fixture(scope="module")
def shared_dir():
    """A folder made by rank 0 and known to every rank, removed once every rank has finished the module's tests
    (the tests' data sets and outputs go under it: nothing left in the temporary folder after the run)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    path = comm.bcast(tempfile.mkdtemp(prefix="mpi_em_test_") if comm.rank == 0 else None, root=0)
    yield path
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)
