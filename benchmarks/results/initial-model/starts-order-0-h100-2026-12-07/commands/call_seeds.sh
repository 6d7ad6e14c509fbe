#!/bin/bash
# one device call: (1) initial-model's whole default job on 100 000 box-128 particles, the tree of the 32.0 s record
# (5c3e29e, .dev/base2) and this one on one machine; (2) 64 seeds of the default job on the set and the
# keep-the-likeliest rule of --starts over every N-subset of them (benchmarks/initial_model_select.py)
set -u
OUT=${1:-/tmp/out}
T0=$SECONDS
. benchmarks/gpu_setup.sh; gpu_setup im-starts-rule
say() { echo "$(date +%T) [$((SECONDS-T0)) s] $*" | tee -a $R/summary.txt; }
python3 -m mpi_em warmup > $R/warmup.log 2>&1 &
WARM=$!
python3 -m mpi_em simulate --out /tmp/imd --box 64 --n 20000 --snr 0.05 --apix 2.5 --seed 1 --device cpu > $R/sim64.log 2>&1
say "issue set: $(tail -1 $R/sim64.log)"
python3 -m mpi_em simulate --out /tmp/d128 --box 128 --n 100000 --snr 0.05 --apix 1.5 --seed 1 --device gpu \
  > $R/sim_128.log 2>&1
sync
say "box-128 set: $(tail -1 $R/sim_128.log)"
wait $WARM; say "warmup: $(tail -1 $R/warmup.log)"
W=/tmp/imgpu; mkdir -p $W
for t in old new old new; do
  n=$t$((SECONDS)); 
  if [ $t = old ]; then
    (cd .dev/base2 && PYTHONPATH=/tmp/site:$PWD timeout 100 python3 benchmarks/initial_model.py --work $W/$n --data /tmp/d128 \
      --device gpu --json $R/whole_$n.json > $R/whole_$n.txt 2>&1)
  else
    timeout 100 python3 benchmarks/initial_model.py --work $W/$n --data /tmp/d128 --device gpu --json $R/whole_$n.json \
      > $R/whole_$n.txt 2>&1
  fi
  cp $W/$n/run.log $R/whole_${n}_run.log 2>/dev/null; rm -rf $W/$n
  say "whole job, $t tree: $(tail -1 $R/whole_$n.txt)"
  [ $((SECONDS-T0)) -lt 230 ] || break
done
( while sleep 20; do nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader >> $R/smi.txt; done ) & SP=$!
left=$((575 - (SECONDS-T0)))
timeout $left python3 benchmarks/initial_model_select.py --work /tmp/sel --data /tmp/imd \
  --seeds $(seq 0 31) $(seq 116 147) --select-at 150 --parallel 8 --device gpu --json $R/select.json > $R/select.txt 2>&1
say "select exit $?: $(grep -a 'at or below' $R/select.txt)"
kill $SP
mkdir -p $R/seeds; cp /tmp/sel/seed*.json $R/seeds/ 2>/dev/null; cp /tmp/sel/cmp150/run.log $R/cmp150_run.log 2>/dev/null
for s in $(seq 0 31) $(seq 116 147); do cp /tmp/sel/w$s/run/run.log $R/seeds/seed${s}_run.log 2>/dev/null; done
gpu_pack
say "all done"
