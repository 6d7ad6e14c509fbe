#!/bin/bash
# Does refine3d's map improve at every iteration? The CPU study of benchmarks/results/refine3d-monotonic/ (box 48,
# SNR 0.25, 2.67 Å/px, start = truth low-passed to 1/4 Nyquist, max order 3; benchmarks/refine3d_iterations.sh)
# repeated on the GPU(s) with 2 ranks, for more seeds, particle counts and variants than 2 CPU cores afford.
#   bash benchmarks/refine3d_monotonic.sh OUT NAME MODE         # from the repo root on the device, wheels in .whl/
# MODE:
#   sweep     data seeds 2-4 x {defaults, --n-select 16, a noisy start (START_NOISE 0.5)}, seeds 2-3 x {3000 and
#             10 000 particles, --perturb 0, START_NOISE 1.0}; 9 iterations; FSC 0.5 of each iteration's half maps
#             with the truth, gold-standard resolution per iteration, final median angular error (sweep.txt)
#   variants  $VARIANTS (default "ro ro_f4 f4") on $N = 10 000 particles, data seed $SEED = 2, $ITER = 10
#             iterations, with convergence switched off (a patched copy of the code, so that the iterations after
#             the peak are seen; CONVERGE=1: the code as shipped) and per-iteration diagnostics
#             (benchmarks/studies/refine3d_diagnose.py, HARD=1: also the hard-assignment reconstruction).
#             Variants (each passes only the options in its name): default (none), nsel16 / nsel64 (--n-select),
#             step05 (--offset-step 0.5), noperturb (--perturb 0), ro (--refine-offsets), f4 / f8 (--folds),
#             ro_f4 (--refine-offsets --folds 4), ro_f8 (--refine-offsets --folds 8)
#   ci        the CI protocol (1000 particles, 20 iterations at most) as shipped, data seeds $CI_SEEDS = "2 3 4",
#             per-iteration diagnostics and the iteration whose files became the final ones (ci.txt)
set -u
OUT=${1:-/tmp/out}; MODE=${3:-variants}; . benchmarks/gpu_setup.sh; gpu_setup ${2:-monotonic}
export MPI_EM_DEVICE=gpu PYTHON=python3 MPIRUN_OPTS="--bind-to none"
iterations() {  # output dir, N, iterations, refine3d options... (environment: DATA_SEED, START_NOISE)
  local d=$1 n=$2 it=$3; shift 3
  timeout ${LIMIT:-200} bash benchmarks/refine3d_iterations.sh $d 48 $n 0.25 2.67 $it 3 --batch 256 "$@" 2>&1 | tail -1
}
sweep1() {  # name, data seed, N, START_NOISE, refine3d options...
  local name=$1 seed=$2 n=$3 sn=$4; shift 4
  echo "$name seed $seed N $n start-noise $sn $*: $(DATA_SEED=$seed START_NOISE=$sn iterations /tmp/o_$name $n 9 "$@")" \
    | tee -a $R/sweep.txt
}
variant() {  # name, refine3d options...
  local name=$1 code=/tmp/nc; shift
  [ -n "${CONVERGE:-}" ] && code=$PWD
  echo "== $name (seed ${SEED:-2}, ${N:-10000} particles, $* ${code})"
  local t0=$(date +%s)
  (cd $code && PYTHONPATH=/tmp/site:$code DATA_SEED=${SEED:-2} iterations /tmp/v_$name ${N:-10000} ${ITER:-10} "$@")
  echo "wall $(( $(date +%s) - t0 )) s"
  grep -E "iteration [0-9]+:" /tmp/v_$name/run.log | sed 's/^.*iteration/iteration/' | cut -c1-120
  (cd $code && PYTHONPATH=/tmp/site:$code timeout 200 python3 $PWD/benchmarks/studies/refine3d_diagnose.py \
    /tmp/v_$name/d /tmp/v_$name/ref ${HARD:+--hard})
}
case $MODE in
  sweep)
    for seed in 2 3 4; do
      sweep1 default_s$seed $seed 1000 0
      sweep1 nsel16_s$seed $seed 1000 0 --n-select 16
      sweep1 noisystart_s$seed $seed 1000 0.5
    done
    for seed in 2 3; do
      sweep1 n3000_s$seed $seed 3000 0
      sweep1 n10000_s$seed $seed 10000 0
      sweep1 noperturb_s$seed $seed 1000 0 --perturb 0
      sweep1 noisystart1_s$seed $seed 1000 1.0
    done ;;
  variants)
    # a copy whose convergence never stops the run
    rm -rf /tmp/nc && mkdir /tmp/nc && cp -r mpi_em benchmarks /tmp/nc/
    sed -i 's/if state.no_improve >= 1:/if state.no_improve >= 99:/' /tmp/nc/mpi_em/em/schedule.py
    [ -n "${CONVERGE:-}" ] || grep -q 'no_improve >= 99' /tmp/nc/mpi_em/em/schedule.py || { echo "patch failed"; exit 1; }
    for v in ${VARIANTS:-ro ro_f4 f4}; do
      case $v in
        default) variant $v ;;
        nsel16) variant $v --n-select 16 ;;
        nsel64) variant $v --n-select 64 ;;
        step05) variant $v --offset-step 0.5 ;;
        noperturb) variant $v --perturb 0 ;;
        ro) variant $v --refine-offsets ;;
        f4) variant $v --folds 4 ;;
        f8) variant $v --folds 8 ;;
        ro_f4) variant $v --refine-offsets --folds 4 ;;
        ro_f8) variant $v --refine-offsets --folds 8 ;;
        *) echo "unknown variant $v"; exit 2 ;;
      esac
    done 2>&1 | tee $R/diagnose.txt ;;
  ci)
    for s in ${CI_SEEDS:-2 3 4}; do
      echo "== CI protocol, data seed $s (as shipped)"
      DATA_SEED=$s iterations /tmp/ci_s$s 1000 20
      timeout 100 python3 benchmarks/studies/refine3d_diagnose.py /tmp/ci_s$s/d /tmp/ci_s$s/ref
    done 2>&1 | tee $R/ci.txt ;;
  *) echo "unknown mode $MODE (sweep, variants, ci)"; exit 2 ;;
esac
gpu_pack
