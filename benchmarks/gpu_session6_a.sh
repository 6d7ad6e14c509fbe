#!/bin/bash
# GPU run Z (session 6; issue 4): leave-one-fold-out references (refine3d --folds F) on the box-48 protocol of the
# monotonicity study (SNR 0.25, truth low-passed to 1/4 Nyquist, max order 3), 2 ranks on the one GPU, per-iteration
# diagnostics (benchmarks/refine3d_diagnose.py). 10 000 particles, data seed 2, convergence switched off (a patched
# copy of the code, as run T) so the iterations after the peak can be seen; VARIANTS picks the option sets.
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session6_a.sh "$OUT" runZ
# The variants pass only the options in their names; from 45127c7 on the defaults are --folds 4 --refine-offsets,
# so there "default" is ro_f4 (runs Z and AC ran at cdcef7f: --folds 1, fixed translations by default).
# Run AE (main at 45127c7): VARIANTS="f8" for N=1000 SEED=2,3,4 and for the 10 000-particle seed 2.
set -u
OUT=${1:-/tmp/out}; NAME=${2:-runZ}; . benchmarks/gpu_setup.sh; gpu_setup $NAME
export MPI_EM_DEVICE=gpu
rm -rf /tmp/nc && mkdir /tmp/nc && cp -r mpi_em benchmarks /tmp/nc/
sed -i 's/if state\["no_improve"\] >= 1:/if state["no_improve"] >= 99:/' /tmp/nc/mpi_em/jobs/em.py
grep -q 'no_improve"\] >= 99' /tmp/nc/mpi_em/jobs/em.py || { echo "patch failed"; exit 1; }
variant() {  # name, iterations, refine3d options...
  local name=$1 it=$2 code=${CODE:-/tmp/nc}; shift 2
  echo "== $name (seed ${SEED:-2}, ${N:-10000} particles, $* ${code})"
  local t0=$(date +%s)
  (cd $code && PYTHONPATH=/tmp/site:$code PYTHON=python3 MPIRUN_OPTS="--bind-to none" DATA_SEED=${SEED:-2} \
    timeout ${LIMIT:-200} bash benchmarks/refine3d_iterations.sh /tmp/v_$name 48 ${N:-10000} 0.25 2.67 $it 3 \
    --batch 256 "$@" | tail -1)
  echo "wall $(( $(date +%s) - t0 )) s"
  grep -E "iteration [0-9]+:" /tmp/v_$name/run.log | sed 's/^.*iteration/iteration/' | cut -c1-120
  (cd $code && PYTHONPATH=/tmp/site:$code timeout 100 python3 benchmarks/refine3d_diagnose.py /tmp/v_$name/d \
    /tmp/v_$name/ref)
}
{
  for v in ${VARIANTS:-ro ro_f4 f4}; do
    case $v in
      ro) variant ro 10 --refine-offsets ;;
      ro_f4) variant ro_f4 10 --refine-offsets --folds 4 ;;
      f4) variant f4 10 --folds 4 ;;
      default) variant default 10 ;;
      f8) variant f8 10 --refine-offsets --folds 8 ;;
    esac
  done
} 2>&1 | tee $R/diagnose.txt
tar czf "$OUT/$NAME.tgz" -C /tmp $NAME
