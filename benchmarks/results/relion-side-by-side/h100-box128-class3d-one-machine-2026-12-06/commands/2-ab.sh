#!/bin/bash
# A/B of the job start and writer on one H100: the tree before (.dev/base = HEAD) against the new one (pinned
# batches without cupyx, figures in their own writer), class3d / class2d / reconstruct at box 128, interleaved
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup box128-ab
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/box128-ab.tgz" -C /tmp box128-ab; }
B=$PWD/.dev/base
python3 -m compileall -q -j 0 "$B/mpi_em" >/dev/null 2>&1
step "set-up done"
( python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d128 --gpu --box 128 --n 10000 --snr 0.05 --apix 1.5 \
  > "$R/data128.log" 2>&1; step "data 128 exit $?" ) & DP=$!
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "pinned" 2>&1 | tail -40 > "$R/gpu_tests.txt"
step "gpu tests: $(tail -1 "$R/gpu_tests.txt")"
wait $DP
D=/tmp/d128
C3="class3d --ref $D/start.mrc --ini-high 30.0 --sym C1 --healpix-order 2 --K 4 --iter 5 --tau2-fudge 4 --i $D/particles_unaligned_abs.star --particle-diameter 153.6 --offset-range 5.0 --offset-step 1.0 --device gpu --seed 0"
C2="class2d --K 50 --iter 5 --psi-step 10 --tau2-fudge 2 --i $D/particles_unaligned_abs.star --particle-diameter 153.6 --offset-range 5.0 --offset-step 1.0 --device gpu --seed 0"
RC="reconstruct --i $D/particles_abs.star --device gpu"
MR="mpirun -n 1 --bind-to none"
mkdir -p /tmp/jobs
job() {  # TREE(base|new) NAME ARGS...
  local tree=$1 name=$2; shift 2
  local t=$EPOCHREALTIME
  if [ $tree = base ]; then (cd $B && PYTHONPATH=$B:/tmp/site timeout 60 $MR python3 -m mpi_em "$@" --o /tmp/jobs/$name > /tmp/jobs/$name.out 2>&1)
  else (cd /tmp/jobs && timeout 60 $MR python3 -m mpi_em "$@" --o /tmp/jobs/$name > /tmp/jobs/$name.out 2>&1); fi
  echo "$name $tree $? $(python3 -c "print(round($EPOCHREALTIME - $t, 3))")" | tee -a "$R/ab.txt"
}
for rep in 1 2 3 4; do job base c3base$rep $C3; job new c3new$rep $C3; done
step "class3d A/B done"
for rep in 1 2 3; do job base c2base$rep $C2; job new c2new$rep $C2; done
step "class2d A/B done"
for rep in 1 2; do job base rcbase$rep $RC; job new rcnew$rep $RC; done
step "reconstruct A/B done"
(cd /tmp/jobs && timeout 60 $MR python3 -m cProfile -o $R/c3new.prof -m mpi_em $C3 --o /tmp/jobs/c3newprof > /tmp/jobs/c3newprof.out 2>&1)
step "profile done"
for n in /tmp/jobs/*/; do b=$(basename $n); mkdir -p $R/jobs/$b; cp $n/run.log $n/run_timings.json $n/run.json $R/jobs/$b/ 2>/dev/null; done
cp /tmp/jobs/*.out $R/jobs/ 2>/dev/null
step end; pack
