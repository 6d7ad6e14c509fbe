#!/bin/bash
# GPU run O (session 4; issue 4's monotonicity): the CPU study of benchmarks/results/issue4-monotonic/ (box 48,
# SNR 0.25, start = truth low-passed to 1/4 Nyquist, max order 3) repeated on 2 GPUs for several data seeds,
# particle counts and variants, which the 2-core CPU cannot afford: FSC 0.5 of each iteration's half maps with
# the truth, gold-standard resolution per iteration, final median angular error.
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session4_b.sh "$OUT"
set -u
OUT=${1:-/tmp/out}; . benchmarks/gpu_setup.sh; gpu_setup runO
export MPI_EM_DEVICE=gpu PYTHON=python3 MPIRUN_OPTS="--bind-to none"
run() {  # name, data seed, N, START_NOISE, refine3d options...
  local name=$1 seed=$2 n=$3 sn=$4; shift 4
  echo "$name seed $seed N $n start-noise $sn $*: $(DATA_SEED=$seed START_NOISE=$sn timeout 120 bash \
    benchmarks/refine3d_iterations.sh /tmp/o_$name 48 $n 0.25 2.67 9 3 --batch 256 "$@" 2>&1 | tail -1)" | tee -a $R/sweep.txt $OUT/sweep.txt
}
for seed in 2 3 4; do
  run default_s$seed $seed 1000 0
  run nsel16_s$seed $seed 1000 0 --n-select 16
  run noisystart_s$seed $seed 1000 0.5
done
for seed in 2 3; do
  run n3000_s$seed $seed 3000 0
  run n10000_s$seed $seed 10000 0
  run noperturb_s$seed $seed 1000 0 --perturb 0
  run noisystart1_s$seed $seed 1000 1.0
done
tar czf "$OUT/runO.tgz" -C /tmp runO
