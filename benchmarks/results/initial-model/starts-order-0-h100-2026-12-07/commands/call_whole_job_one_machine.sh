#!/bin/bash
# initial-model's whole job on 100 000 box-128 particles on one GPU: the tree of the 32.0 s record (5c3e29e, one
# start, .dev/base2), this tree with one start, and this tree's default (three starts), interleaved
set -u
OUT=${1:-/tmp/out}
T0=$SECONDS
. benchmarks/gpu_setup.sh; gpu_setup im-whole-job-starts
say() { echo "$(date +%T) [$((SECONDS-T0)) s] $*" | tee -a $R/summary.txt; }
python3 -m mpi_em warmup > $R/warmup.log 2>&1 &
WARM=$!
python3 -m mpi_em simulate --out /tmp/d128 --box 128 --n 100000 --snr 0.05 --apix 1.5 --seed 1 --device gpu \
  > $R/sim_128.log 2>&1
sync
say "box-128 set: $(tail -1 $R/sim_128.log)"
wait $WARM; say "warmup: $(tail -1 $R/warmup.log)"
W=/tmp/imgpu; mkdir -p $W
job() {  # job NAME TREE(old|new) LIMIT [initial-model options]
  local name=$1 tree=$2 lim=$3; shift 3
  local left=$((570 - (SECONDS-T0)))
  [ $left -gt 40 ] || { say "$name: no time left"; return; }
  [ $lim -lt $left ] || lim=$left
  if [ $tree = old ]; then
    (cd .dev/base2 && PYTHONPATH=/tmp/site:$PWD timeout $lim python3 benchmarks/initial_model.py --work $W/$name \
      --data /tmp/d128 --device gpu --json $R/$name.json ${1:+--} "$@" > $R/$name.txt 2>&1)
  else
    timeout $lim python3 benchmarks/initial_model.py --work $W/$name --data /tmp/d128 --device gpu --json $R/$name.json \
      ${1:+--} "$@" > $R/$name.txt 2>&1
  fi
  cp $W/$name/run.log $R/${name}_run.log 2>/dev/null; rm -rf $W/$name
  say "$name ($tree tree): $(tail -1 $R/$name.txt)"
}
job old_1 old 100
job new_starts1_1 new 100 --starts 1
job new_default_1 new 150
job old_2 old 100
job new_starts1_2 new 100 --starts 1
job new_default_2 new 150
gpu_pack
say "all done"
