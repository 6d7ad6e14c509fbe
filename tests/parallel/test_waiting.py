"""Ranks that wait for rank 0 (its file input and output, in root_step) do not spin a core (under mpirun)."""
from __future__ import annotations

import resource
import time

import pytest
from mpi4py import MPI

from mpi_em.distributed import RankFailed, root_step


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@pytest.mark.mpi(min_size=2)
def test_ranks_waiting_for_rank_0_leave_the_core_free():
    """Rank 0 works 2 s alone (as it reads the inputs or waits for its writer); the others wait in root_step.
    MPI's blocking collectives busy-poll: a rank waiting 3 s that way used 2.3 s of CPU (measured, MPICH, 2 ranks
    on 2 cores), taken from the ranks and jobs that share its core. Waiting now costs a few percent of it."""
    comm = MPI.COMM_WORLD
    comm.Barrier()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    got = root_step(comm, lambda: (time.sleep(2.0), "done")[1])
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    assert got == "done"
    if comm.rank > 0:
        assert wall >= 1.9, wall
        assert cpu < 0.25 * wall, (cpu, wall)


@pytest.mark.mpi(min_size=2)
def test_a_failure_on_rank_0_still_reaches_the_waiting_ranks():
    comm = MPI.COMM_WORLD

    def fail():
        time.sleep(0.2)
        raise ValueError("bad input")

    with pytest.raises(RankFailed, match="bad input"):
        root_step(comm, fail)
