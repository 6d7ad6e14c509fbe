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
# The serial tests: one pytest process per test file, as many at once as there are cores (at most 4; a 2-core CI
# machine runs two), the longest files first (in the order of their times on 2 cores: 435, 322, 202, 129, 90, 87,
# 75, 37, 34, 22, 21, 16, 14 s) so that the shortest fill in at the end; each file's output is
# printed whole after all have finished. MPI_EM_TEST_JOBS=1 runs them one file after another.
jobs=${MPI_EM_TEST_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 2)}
[ "$jobs" -le 4 ] || jobs=4
longest="test_initial_model test_em_jobs test_relion test_classification test_memory test_reconstruct_job test_faults
 test_side_by_side test_solvent_mask test_postprocess test_slurm test_relion_parity test_symaxis"
files=()
for f in $longest; do [ -f "tests/$f.py" ] && files+=("tests/$f.py"); done
# tests/parallel's files too: their tests without the mpi mark run here (the mpi ones skip without --with-mpi)
for f in tests/test_*.py tests/parallel/test_*.py; do case " ${files[*]} " in *" $f "*) ;; *) files+=("$f");; esac; done
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
start=$SECONDS
printf '%s\n' "${files[@]}" | xargs -P "$jobs" -I{} sh -c \
  'f={}; b=$(echo "$f" | tr / _); python -m pytest -q -p no:cacheprovider --durations=5 "$f" > "$0/$b.log" 2>&1;
   echo $? > "$0/$b.rc"' "$logs"
failed=()
for f in "${files[@]}"; do
  b=$(echo "$f" | tr / _)
  echo "== $f"; cat "$logs/$b.log"
  rc=$(cat "$logs/$b.rc" 2>/dev/null || echo 1)
  [ "$rc" = 0 ] || [ "$rc" = 5 ] || failed+=("$f (exit $rc)")
done
echo "== serial tests: ${#files[@]} files, $jobs at a time, $((SECONDS - start)) s"
for P in 2 3; do
  echo "== mpirun -n $P: tests/parallel"
  mpirun -n "$P" python -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests/parallel
done
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
