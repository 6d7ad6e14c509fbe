#!/usr/bin/env bash
# The whole test suite, from a fresh machine with only Python: venv, install (with PyPI's MPICH), then
# the serial tests, then the MPI tests under `mpirun -n 2` and `mpirun -n 3` (oversubscribed: uneven splits).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[mpi,test]"
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
python -m pytest -q -p no:cacheprovider tests
for P in 2 3; do
  echo "== mpirun -n $P: tests/parallel"
  mpirun -n "$P" python -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests/parallel
done
