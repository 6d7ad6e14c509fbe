#!/bin/bash
# 16 more seeds (16-31) of the default initial-model on the set (CPU-simulated: the same particles as the CPU's
# eight seeds), 8 jobs at a time on the GPU; then the 24 seeds' maps after iterations 10, 20, 40, 150 compared
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh; gpu_setup im-select
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { cp /tmp/sel/seed*.json /tmp/sel/*.log "$R/" 2>/dev/null; tar czf "$OUT/im-select.tgz" -C /tmp im-select; }
D=/tmp/imd
( python3 -m mpi_em warmup > $R/warmup.log 2>&1; step "warmup exit $?" ) & WP=$!
python3 -m mpi_em simulate --out $D --box 64 --n 20000 --snr 0.05 --apix 2.5 --seed 1 --device cpu > $R/sim.log 2>&1
step "simulate exit $?: $(md5sum $D/truth.mrc $(ls $D/stacks/* | head -1) | tr "\n" " ")"
wait $WP
( while sleep 20; do nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader >> $R/smi.txt; done ) & SP=$!
timeout 470 python3 benchmarks/initial_model_select.py --work /tmp/sel --data $D --seeds $(seq 16 31) \
  --select-at 20 150 10 --parallel 8 --device gpu --maps-from $PWD/.dev/ims_cpu --json $R/select.json \
  > $R/select.txt 2>&1
step "select exit $?"
kill $SP
for s in $(seq 16 31); do cp /tmp/sel/w$s/run/run.log $R/seed${s}_run.log 2>/dev/null; done
for j in 10 20 150; do cp /tmp/sel/cmp$j/run.log $R/cmp${j}_run.log 2>/dev/null; done
pack
# with the time left: the GPU tests, then the STAR writer on 16 cores
if [ $(( $(date +%s) - T0 )) -lt 470 ]; then
  timeout $(( 560 - ($(date +%s) - T0) )) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3 > $R/gpu_tests.txt
  step "gpu tests: $(tail -1 $R/gpu_tests.txt)"; pack
fi
if [ $(( $(date +%s) - T0 )) -lt 540 ]; then
  timeout $(( 590 - ($(date +%s) - T0) )) python3 benchmarks/star_write.py --n 750000 --workers 1 2 4 8 --repeat 1 \
    --json $R/star_write_750k.json > $R/star_write_750k.txt 2>&1
  step "star write exit $?"; pack
fi
