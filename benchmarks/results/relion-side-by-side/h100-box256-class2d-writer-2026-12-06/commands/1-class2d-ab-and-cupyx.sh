#!/bin/bash
# box-256 class2d (K = 50, 25 it., 4 000 particles): the tree before (.dev/base) and the new one interleaved, the new
# one through the side-by-side script with RELION's record; who loads cupyx in a GPU job
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup box256-class2d-writer
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/box256-class2d-writer.tgz" -C /tmp box256-class2d-writer; }
B=$PWD/.dev/base
python3 -m compileall -q -j 0 "$B/mpi_em" >/dev/null 2>&1
step "set-up done"
( python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d256 --gpu --box 256 --n 4000 --snr 0.05 --apix 1.5 \
  > "$R/data256.log" 2>&1; step "data 256 exit $?" ) & DP=$!
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"


wait $DP
D=/tmp/d256
(cd /tmp && timeout 100 mpirun -n 1 --bind-to none python3 $OLDPWD/$(dirname $0)/import_spy.py class2d --K 50 --iter 1 --psi-step 10 \
  --tau2-fudge 2 --i $D/particles_unaligned_abs.star --particle-diameter 307.2 --offset-range 5.0 --offset-step 1.0 \
  --device gpu --seed 0 --o /tmp/spy2 > $R/spy2.txt 2>&1); step "spy exit $?"
pack
C2="class2d --K 50 --iter 25 --psi-step 10.0 --tau2-fudge 2 --i $D/particles_unaligned_abs.star --particle-diameter 307.2 --offset-range 5.0 --offset-step 1.0 --device gpu --seed 0"
MR="mpirun -n 1 --bind-to none"
mkdir -p /tmp/jobs
job() {  # TREE(base|new) NAME ARGS...
  local tree=$1 name=$2; shift 2
  local t=$EPOCHREALTIME
  if [ $tree = base ]; then (cd $B && PYTHONPATH=$B:/tmp/site timeout 60 $MR python3 -m mpi_em "$@" --o /tmp/jobs/$name > /tmp/jobs/$name.out 2>&1)
  else (cd /tmp/jobs && timeout 60 $MR python3 -m mpi_em "$@" --o /tmp/jobs/$name > /tmp/jobs/$name.out 2>&1); fi
  echo "$name $tree $? $(python3 -c "print(round($EPOCHREALTIME - $t, 3))")" | tee -a "$R/ab.txt"
}
job base c2base1 $C2; job new c2new1 $C2
mkdir -p /tmp/sbs256c2 && cp $(dirname $0)/relion_class2d_box256_record.json /tmp/sbs256c2/side_by_side.json
SUMMARY=$R/box256-class2d PROGRAMS=mpi_em DATA=$D JOBS=class2d ITER=25 TIMEOUT=100 timeout 130 \
  bash benchmarks/relion_side_by_side_gpu.sh /tmp/sbs256c2 4000 256 > "$R/sbs_class2d.log" 2>&1
step "side by side class2d (ours) exit $?: $(grep -h 'wall ours' /tmp/sbs256c2/side_by_side.txt 2>/dev/null)"
job base c2base2 $C2; job new c2new2 $C2
step "class2d A/B done"
for n in /tmp/jobs/*/; do b=$(basename $n); mkdir -p $R/jobs/$b; cp $n/run.log $n/run_timings.json $R/jobs/$b/ 2>/dev/null; done
step end; pack
