#!/bin/bash
# one device call: initial-model's checkpoints once a minute (the default) against after every mini-batch
set -u
OUT=${1:-/tmp/out}
T0=$SECONDS
. benchmarks/gpu_setup.sh; gpu_setup initial-model-checkpoint
W=/tmp/imgpu; D2=$W/d128; mkdir -p $W
say() { echo "$(date +%T) [$((SECONDS-T0)) s] $*" | tee -a $R/summary.txt; }
python3 -m mpi_em warmup > $R/warmup.log 2>&1 &
python3 -m mpi_em simulate --out $D2 --box ${BOX:-128} --n ${NSIM:-100000} --snr 0.05 --apix 1.5 --seed 1 --device ${DEV:-gpu} \
  > $R/sim_128.log 2>&1
wait; sync
say "warmup + simulation + sync done"
BASE=$PWD/.dev/base
job() {  # job NAME TREE(new|old) LIMIT [benchmark options [-- job options]]
  local name=$1 tree=$2 lim=$3; shift 3
  local left=$((${CAP:-560} - (SECONDS-T0)))
  [ $left -gt 40 ] || { say "$name: no time left"; return; }
  [ $lim -lt $left ] || lim=$left
  if [ $tree = old ]; then
    (cd $BASE && timeout $lim python3 benchmarks/initial_model.py --work $W/$name --data $D2 --device ${DEV:-gpu} \
      --json $R/$name.json "$@" > $R/$name.txt 2>&1)
  else
    timeout $lim python3 benchmarks/initial_model.py --work $W/$name --data $D2 --device ${DEV:-gpu} --json $R/$name.json \
      "$@" > $R/$name.txt 2>&1
  fi
  cp $W/$name/run.log $R/${name}_run.log 2>/dev/null
  say "$name ($tree): $(tail -1 $R/$name.txt)"
}
job whole_default new 150
job whole_every new 150 -- --checkpoint-interval 0
python3 - $W > $R/maps_compared.txt 2>&1 <<'PY'
import sys, numpy as np
from mpi_em.io import read_map
w = sys.argv[1]
a, b = (read_map(f"{w}/{n}/run/run_class001.mrc")[0] for n in ("whole_default", "whole_every"))
print("the same job twice (checkpoints apart): max |difference| / max |map| = %.3g"
      % (np.abs(a - b).max() / np.abs(a).max()))
PY
say "$(cat $R/maps_compared.txt)"
nvidia-smi --query-gpu=memory.used --format=csv,noheader > $R/memory_after.txt 2>/dev/null
gpu_pack
say "all done"
