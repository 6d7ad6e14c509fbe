#!/bin/bash
# kernels compiled after the warmup by the warmup test's box-256 refine3d (200 particles), sources saved
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup z3
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/z3.tgz" -C /tmp z3; }
export CUPY_CACHE_DIR=/tmp/wc CUPY_CACHE_SAVE_CUDA_SOURCE=1
snap() { find /tmp/wc -type f | sort > "$R/cache_$1.txt"; step "cache after $1: $(wc -l < "$R/cache_$1.txt") files"; }
( python3 -m mpi_em simulate --out /tmp/big --box 256 --n 200 --snr 0.2 --seed 11 > /dev/null 2>&1; step "sim exit $?" ) & SP=$!
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"; snap warmup
wait $SP
python3 -m mpi_em refine3d --i /tmp/big/particles.star --ref /tmp/big/truth.mrc --ini-high 30 --iter 2 --o /tmp/rb \
  > "$R/big_refine3d.log" 2>&1; step "box-256 refine3d exit $?"; snap big
mkdir -p "$R/new_kernels"
comm -13 "$R/cache_warmup.txt" "$R/cache_big.txt" | while read f; do cp "$f" "$R/new_kernels/" 2>/dev/null; done
python3 -m mpi_em refine3d --i /tmp/big/particles.star --ref /tmp/big/truth.mrc --ini-high 30 --iter 2 --o /tmp/rb2 \
  --batch 40 > "$R/big_refine3d_b40.log" 2>&1; step "box-256 refine3d batch 40 exit $?"; snap big40
step end; pack
