#!/bin/bash
# where the fixed seconds of a box-128 class3d / class2d job go: process start, imports, set-up, first pass,
# first iteration, final files (cProfile + importtime + plain walls), after mpi-em warmup
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup box128-profile
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/box128-profile.tgz" -C /tmp box128-profile; }
step "set-up done"
( python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d128 --gpu --box 128 --n 10000 --snr 0.05 --apix 1.5 \
  > "$R/data128.log" 2>&1; step "data 128 exit $?" ) & DP=$!
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"
wait $DP
D=/tmp/d128
C3="class3d --ref $D/start.mrc --ini-high 30.0 --sym C1 --healpix-order 2 --K 4 --iter 5 --tau2-fudge 4 --i $D/particles_unaligned_abs.star --particle-diameter 153.6 --offset-range 5.0 --offset-step 1.0 --device gpu --seed 0"
C2="class2d --K 50 --iter 5 --psi-step 10 --tau2-fudge 2 --i $D/particles_unaligned_abs.star --particle-diameter 153.6 --offset-range 5.0 --offset-step 1.0 --device gpu --seed 0"
MR="mpirun -n 1 --bind-to none"
w() { local t=$EPOCHREALTIME; "$@" > /dev/null 2>&1; python3 -c "print(round($EPOCHREALTIME - $t, 3))"; }
{
echo "mpirun python -c pass: $(w $MR python3 -c pass)"
echo "python -c pass: $(w python3 -c pass)"
echo "python import numpy mpi4py.MPI: $(w python3 -c 'import numpy, mpi4py.MPI')"
echo "mpirun python import mpi4py.MPI: $(w $MR python3 -c 'import numpy, mpi4py.MPI')"
echo "python cupy zeros: $(w python3 -c 'import cupy as cp; cp.zeros(1); cp.cuda.Device().synchronize()')"
echo "python cupy zeros + fft: $(w python3 -c 'import cupy as cp; a=cp.zeros((64,128,128),cp.complex64); cp.fft.fftn(a,axes=(1,2)); cp.cuda.Device().synchronize()')"
echo "mpi-em --help: $(w python3 -m mpi_em class3d --help)"
} > "$R/walls.txt" 2>&1
cat "$R/walls.txt"
run() {  # NAME ENV... -- ARGS
  local name=$1; shift
  local t=$EPOCHREALTIME
  env "$@" > /tmp/runs_$name.out 2>&1
  echo "$name: $(python3 -c "print(round($EPOCHREALTIME - $t, 3))") s" | tee -a "$R/job_walls.txt"
}
mkdir -p /tmp/jobs && cd /tmp/jobs
for rep in 1 2; do
  run c3plain$rep $MR python3 -m mpi_em $C3 --o /tmp/jobs/c3plain$rep
done
run c3prof $MR python3 -m cProfile -o $R/c3.prof -m mpi_em $C3 --o /tmp/jobs/c3prof
run c3imp $MR python3 -X importtime -m mpi_em $C3 --o /tmp/jobs/c3imp
cp /tmp/runs_c3imp.out $R/c3_importtime.txt
run c3detail MPI_EM_TIMING_DETAIL=1 $MR python3 -m mpi_em $C3 --o /tmp/jobs/c3detail
for rep in 1 2; do
  run c2plain$rep $MR python3 -m mpi_em $C2 --o /tmp/jobs/c2plain$rep
done
run c2prof $MR python3 -m cProfile -o $R/c2.prof -m mpi_em $C2 --o /tmp/jobs/c2prof
cd - > /dev/null
for n in /tmp/jobs/*/; do b=$(basename $n); mkdir -p $R/$b; cp $n/run.log $n/run_timings.json $R/$b/ 2>/dev/null; done
step end; pack
