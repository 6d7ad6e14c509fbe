#!/usr/bin/env bash
# The whole test suite, from a fresh machine with only Python: venv, install (with PyPI's MPICH), then
# the serial tests, then the MPI tests under `mpirun -n 2` and `mpirun -n 3` (oversubscribed: uneven splits).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# ---- Slurm for tests/test_slurm.py (a one-node slurmctld/slurmd the test starts itself): installed only as root
# ---- with apt-get (Debian/Ubuntu; about 40 s); elsewhere that test skips. MPI_EM_NO_SLURM=1 leaves it out.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v slurmctld >/dev/null \
   && [ -z "${MPI_EM_NO_SLURM:-}" ]; then
  echo "== installing slurm-wlm and munge for tests/test_slurm.py"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) \
    || echo "   slurm-wlm/munge not installed: tests/test_slurm.py will skip"
fi
# ----

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[mpi,test]"
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
python -m pytest -q -p no:cacheprovider tests
for P in 2 3; do
  echo "== mpirun -n $P: tests/parallel"
  mpirun -n "$P" python -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests/parallel
done
