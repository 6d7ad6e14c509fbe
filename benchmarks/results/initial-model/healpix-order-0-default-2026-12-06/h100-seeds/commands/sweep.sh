#!/bin/bash
# initial-model variants on the set (20 000 box-64 particles of the compact phantom, SNR 0.05), each on the
# seeds $SEEDS (default 100-107), 8 jobs at a time on the GPU, default schedule plus the variant's options.
# usage: bash sweep.sh "NAME OPTIONS..." ...     (LIMIT: seconds for the whole command, default 580)
set -u
T0=$(date +%s); LIMIT=${LIMIT:-580}; SEEDS=${SEEDS:-"100 101 102 103 104 105 106 107"}
source benchmarks/gpu_setup.sh; gpu_setup im-sweep
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
D=/tmp/imd
( python3 -m mpi_em warmup > $R/warmup.log 2>&1; step "warmup exit $?" ) & WP=$!
python3 -m mpi_em simulate --out $D --box 64 --n 20000 --snr 0.05 --apix 2.5 --seed 1 --device cpu > $R/sim.log 2>&1
step "simulate exit $?"
wait $WP
( while sleep 20; do nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader >> $R/smi.txt; done ) & SP=$!
for v in "$@"; do
  set -- $v; name=$1; shift
  left=$(( LIMIT - ($(date +%s) - T0) ))
  [ $left -lt 60 ] && { step "$name not started: $left s left"; continue; }
  timeout $left python3 benchmarks/initial_model_select.py --work /tmp/sw/$name --data $D --seeds $SEEDS \
    --select-at --parallel 8 --device gpu --json $R/$name.json -- "$@" > $R/$name.txt 2>&1
  rc=$?; pkill -f initial_model.py; pkill -f "mpi_em initial-model"
  step "$name ($*) exit $rc: $(grep -a 'seeds at or below' $R/$name.txt)"
  mkdir -p $R/$name; cp /tmp/sw/$name/seed*.json $R/$name/ 2>/dev/null
  for s in $SEEDS; do cp /tmp/sw/$name/w$s/run/run.log $R/$name/seed${s}_run.log 2>/dev/null; done
  tar czf $OUT/im-sweep.tgz -C /tmp im-sweep
done
kill $SP
tar czf $OUT/im-sweep.tgz -C /tmp im-sweep
