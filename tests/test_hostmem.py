"""Host memory of CPU ranks (mpi_em/hostmem.py): freed NumPy temporaries are kept by the C allocator for the next
ones instead of returned to the system and faulted in again, page by page, on every batch."""
import subprocess
import sys

import pytest

from mpi_em import hostmem

# three 16 MiB temporaries freed together, forty times (the shape of an E-step's per-batch temporaries): the minor
# page faults of the loop
LOOP = """
import resource, sys
import numpy as np
if sys.argv[1] != "plain":
    from mpi_em.hostmem import keep_freed_memory
    assert keep_freed_memory() == (sys.argv[1] == "kept")
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    a = [np.ones(2 ** 21) for _ in range(3)]
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode, **env):
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "MPI_EM_KEEP_FREED"))}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, env=e, timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


@pytest.mark.skipif(not hostmem.glibc(), reason="the C library is not glibc (mallopt's settings are glibc's)")
def test_freed_temporaries_are_not_faulted_in_again():
    """Without the setting every round faults its 48 MiB in again (40 x 12 288 pages; measured 41 333 faults),
    with it only the first round does (measured 1 545: the arrays' first touch, in huge pages where the kernel
    gives them): at most a quarter of the default's faults, which the default cannot pass."""
    plain, kept = _faults("plain"), _faults("kept")
    print(f"minor page faults: default {plain}, freed memory kept {kept}")
    assert kept * 4 < plain, (plain, kept)


@pytest.mark.skipif(not hostmem.glibc(), reason="the C library is not glibc")
def test_a_users_own_allocator_settings_are_left_alone(monkeypatch):
    """MALLOC_* or GLIBC_TUNABLES in the environment: the user's allocator settings stand (nothing set);
    MPI_EM_KEEP_FREED_MEMORY=0: glibc's defaults (the faults of the default, measured in a process)."""
    for name in ("MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "MPI_EM_KEEP_FREED_MEMORY"):
        monkeypatch.setenv(name, "glibc.malloc.trim_threshold=0" if name == "GLIBC_TUNABLES" else "0")
        assert hostmem.keep_freed_memory() is False
        monkeypatch.delenv(name)
    plain, off = _faults("plain"), _faults("kept-if-asked", MPI_EM_KEEP_FREED_MEMORY="0")
    assert off * 4 > plain * 3, (plain, off)


def test_every_command_keeps_freed_memory(monkeypatch):
    """The CLI asks for it before the job's first array (mpi_em.cli.main)."""
    calls = []
    monkeypatch.setattr(hostmem, "keep_freed_memory", lambda: calls.append(1) or True)
    from mpi_em import cli

    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert calls == [1]
