#!/bin/bash
# which kernel the warmup test's re-seeding stage compiles after the warmup: snapshots after each of its jobs
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup z5
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/z5.tgz" -C /tmp z5; }
export CUPY_CACHE_DIR=/tmp/wc CUPY_CACHE_SAVE_CUDA_SOURCE=1
snap() { find /tmp/wc -type f -name "*.cubin" | sort > "$R/cache_$1.txt"; step "cache after $1: $(wc -l < "$R/cache_$1.txt")"; }
( python3 -m mpi_em simulate --out /tmp/w64 --box 64 --n 600 --snr 0.2 --seed 11 > /dev/null 2>&1 ) & SP=$!
python3 -m mpi_em warmup --large-box 0 > "$R/warmup.log" 2>&1; step "warmup exit $?"; snap warmup
wait $SP
D=/tmp/w64
m() { python3 -m mpi_em "$@" > "$R/$1_$(date +%s%N).log" 2>&1; }
m refine3d --i $D/particles.star --ref $D/truth.mrc --ini-high 25 --iter 4 --max-order 3 --local-from-order 3 --o /tmp/r; snap r
m class2d --i $D/particles.star --K 50 --iter 1 --o /tmp/c; snap c
m class2d --i $D/particles.star --K 5 --iter 2 --reseed-below 0.99 --o /tmp/c2; snap c2
m class3d --i $D/particles.star --ref $D/truth.mrc --K 3 --iter 2 --reseed-below 0.99 --o /tmp/c3; snap c3
mkdir -p "$R/new"
comm -13 "$R/cache_warmup.txt" "$R/cache_c3.txt" | while read f; do cp "$f.cu" "$R/new/" 2>/dev/null; done
step end; pack
