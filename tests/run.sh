#!/usr/bin/env bash
# The whole test suite, from a fresh machine with only Python: venv, install (with PyPI's MPICH), then
# the serial tests, then the MPI tests under `mpirun -n 2` and `mpirun -n 3` (oversubscribed: uneven splits).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# ---- Real parts the tests use where they can be installed (root with apt-get, Debian/Ubuntu; elsewhere those
# ---- tests skip and say why):
#  - Debian's relion package (CPU + MPI) for the conformance tests against RELION (tests/test_relion.py, ...);
#    its Open MPI goes to /usr/bin: the venv's MPICH stays first on PATH (test_relion.py asserts it);
#  - slurm-wlm and munge for tests/test_slurm.py (a one-node slurmctld/slurmd the test starts itself);
#    MPI_EM_NO_SLURM=1 leaves Slurm out.
pkgs=()
command -v relion_reconstruct >/dev/null || pkgs+=(relion)
[ -n "${MPI_EM_NO_SLURM:-}" ] || command -v slurmctld >/dev/null || pkgs+=(slurm-wlm munge)
if [ ${#pkgs[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing ${pkgs[*]} (Debian packages) for the tests against RELION and Slurm"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null; } \
    || echo "   could not install ${pkgs[*]}: the tests that need them will skip"
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[mpi,test]"
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
python -m pytest -q -p no:cacheprovider --durations=25 tests
for P in 2 3; do
  echo "== mpirun -n $P: tests/parallel"
  mpirun -n "$P" python -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests/parallel
done
