#!/bin/bash
# one H100: RELION 5's box-128 class3d beside ours (the new tree), then A/B of the job start: the tree before
# (.dev/base = HEAD) against the new one, class3d / class2d / reconstruct at box 128, interleaved
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup box128-sbs
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/box128-sbs.tgz" -C /tmp box128-sbs; }
B=$PWD/.dev/base
python3 -m compileall -q -j 0 "$B/mpi_em" >/dev/null 2>&1
step "set-up done"
( cd .relion-gpu && bash build.sh refine_mpi > "$R/build.log" 2>&1; echo "build exit $?" >> "$R/build.log" ) & BPID=$!
( python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d128 --gpu --box 128 --n 10000 --snr 0.05 --apix 1.5 \
  > "$R/data128.log" 2>&1; step "data 128 exit $?" ) & DP=$!
{ python3 -c "import sys; print('dont_write_bytecode', sys.flags.dont_write_bytecode, 'prefix', sys.pycache_prefix)"
  env | grep -E '^PYTHON' ; for m in matplotlib pandas scipy cupy; do
  d=$(python3 -c "import os, $m; print(os.path.dirname($m.__file__))")
  echo "$m $d py $(find $d -name '*.py' | wc -l) pyc $(find $d -name '*.pyc' | wc -l) writable $( [ -w $d ] && echo yes || echo no)"; done; } > "$R/pyc.txt" 2>&1
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "pinned" 2>&1 | tail -3 > "$R/gpu_tests.txt"
step "gpu tests: $(tail -1 "$R/gpu_tests.txt")"
wait $DP
wait $BPID; step "$(tail -1 "$R/build.log")"
SUMMARY=$R/box128-class3d DATA=/tmp/d128 JOBS=class3d ITER=5 TIMEOUT=220 timeout 260 \
  bash benchmarks/relion_side_by_side_gpu.sh /tmp/sbs128 10000 128 > "$R/sbs_class3d.log" 2>&1
step "side by side class3d exit $?: $(grep -h 'wall ours' /tmp/sbs128/side_by_side.txt 2>/dev/null)"
pack
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
for rep in 1 2 3; do job base c3base$rep $C3; job new c3new$rep $C3; done
step "class3d A/B done"
for rep in 1 2; do job base c2base$rep $C2; job new c2new$rep $C2; done
step "class2d A/B done"
for rep in 1 2; do job base rcbase$rep $RC; job new rcnew$rep $RC; done
step "reconstruct A/B done"
for n in /tmp/jobs/*/; do b=$(basename $n); mkdir -p $R/jobs/$b; cp $n/run.log $n/run_timings.json $n/run.json $R/jobs/$b/ 2>/dev/null; done
cp /tmp/jobs/*.out $R/jobs/ 2>/dev/null
step end; pack
