#!/bin/bash
# initial-model on 100 000 box-128 particles, one GPU: the default (three starts), one start, K = 3; CuPy's pool
# peaks (held, used) sampled in the job, nvidia-smi's peak by the benchmark, the memory model's figure in run.json
set -u
OUT=${1:-/tmp/out}
T0=$SECONDS
. benchmarks/gpu_setup.sh; gpu_setup im-k3-memory
say() { echo "$(date +%T) [$((SECONDS-T0)) s] $*" | tee -a $R/summary.txt; }
python3 -m mpi_em warmup > $R/warmup.log 2>&1 &
WARM=$!
python3 -m mpi_em simulate --out /tmp/d128 --box 128 --n 100000 --snr 0.05 --apix 1.5 --seed 1 --device gpu \
  > $R/sim_128.log 2>&1
sync
say "box-128 set: $(tail -1 $R/sim_128.log)"
wait $WARM; say "warmup: $(tail -1 $R/warmup.log)"
W=/tmp/imgpu; mkdir -p $W
job() {  # job NAME LIMIT [initial-model options]
  local name=$1 lim=$2; shift 2
  local left=$((560 - (SECONDS-T0)))
  [ $left -gt 40 ] || { say "$name: no time left"; return; }
  [ $lim -lt $left ] || lim=$left
  MEMPROBE_OUT=$R/${name}_pool.txt PYTHONPATH=$PWD/benchmarks/results/initial-model/starts-memory-and-k3-h100-2026-12-07/commands/memprobe:$PYTHONPATH timeout $lim python3 \
    benchmarks/initial_model.py --work $W/$name --data /tmp/d128 --device gpu --json $R/$name.json ${BK:-} ${1:+--} "$@" \
    > $R/$name.txt 2>&1
  cp $W/$name/run.log $R/${name}_run.log 2>/dev/null; cp $W/$name/run.json $R/${name}_run.json 2>/dev/null
  rm -rf $W/$name
  say "$name: $(tail -1 $R/$name.txt) | $(cat $R/${name}_pool.txt 2>/dev/null | tr '\n' ' ')"
}
job default 150
job starts1 100 --starts 1
BK="--K 3" job k3 250
job default_b 150
gpu_pack
say "all done"
