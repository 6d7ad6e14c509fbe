#!/usr/bin/env bash
# The whole test suite, from a fresh machine with only Python: venv, install (with PyPI's MPICH), then
# the serial tests, then the MPI tests under `mpirun -n 2` and `mpirun -n 3` (oversubscribed: uneven splits).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[mpi,test]"
# RELION (Debian's package, CPU + MPI) for the conformance tests (tests/test_relion.py); where it cannot be
# installed (not root, no apt-get) those tests skip and say why. Its Open MPI goes to /usr/bin: the tests keep
# the venv's MPICH first on PATH (and test_relion.py asserts that the MPI tests use it).
if ! command -v relion_reconstruct >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing RELION (Debian's relion package) for the conformance tests"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq relion >/dev/null; } \
    || echo "   could not install RELION: its tests will skip"
fi
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
python -m pytest -q -p no:cacheprovider tests
for P in 2 3; do
  echo "== mpirun -n $P: tests/parallel"
  mpirun -n "$P" python -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests/parallel
done
