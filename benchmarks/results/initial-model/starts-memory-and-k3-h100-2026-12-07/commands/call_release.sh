#!/bin/bash
# initial-model on 100 000 box-128 particles, one GPU: the tree before the pool's blocks were given back at the
# starts' boundaries and the running sums before the passes (f9b2050, .dev/base3) and this one, interleaved;
# CuPy's pool peaks (held, used) sampled in the job, nvidia-smi's peak by the benchmark
# .dev/base3: `git archive f9b2050 mpi_em $(git ls-tree --name-only f9b2050 benchmarks/ | grep -E "\.(py|sh)$") | tar x -C .dev/base3`
set -u
OUT=${1:-/tmp/out}
T0=$SECONDS; ROOT=$PWD
. benchmarks/gpu_setup.sh; gpu_setup im-release-memory; python3 -m compileall -q -j 0 .dev/base3/mpi_em >/dev/null 2>&1
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
  local left=$((560 - (SECONDS-T0)))
  [ $left -gt 40 ] || { say "$name: no time left"; return; }
  [ $lim -lt $left ] || lim=$left
  local dir=$ROOT; [ $tree = old ] && dir=$ROOT/.dev/base3
  (cd $dir && MEMPROBE_OUT=$R/${name}_pool.txt PYTHONPATH=$ROOT/benchmarks/results/initial-model/starts-memory-and-k3-h100-2026-12-07/commands/memprobe:/tmp/site:$dir timeout $lim python3 \
    benchmarks/initial_model.py --work $W/$name --data /tmp/d128 --device gpu --json $R/$name.json ${1:+--} "$@" \
    > $R/$name.txt 2>&1)
  cp $W/$name/run.log $R/${name}_run.log 2>/dev/null; rm -rf $W/$name
  say "$name ($tree): $(tail -1 $R/$name.txt) | $(grep initial-model $R/${name}_pool.txt 2>/dev/null | cut -d: -f2-)"
}
job old_default_1 old 150
job new_default_1 new 150
job new_starts1_1 new 100 --starts 1

job new_default_2 new 150

gpu_pack
say "all done"
