#!/bin/bash
# zero mask: kernels compiled after the warmup (sources saved), box-256 class3d side by side with --zero-mask (one class
# as RELION, and the defaults), the default as a control, header statistics timing, GPU tests
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup z1
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/z1.tgz" -C /tmp z1; }
el() { echo $(( $(date +%s) - T0 )); }
export CUPY_CACHE_DIR=/tmp/wc CUPY_CACHE_SAVE_CUDA_SOURCE=1
step "set-up done"
( python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d256b --gpu --box 256 --n 3000 --snr 0.05 --apix 1.5 \
  > "$R/data.log" 2>&1; step "data exit $?" ) & DP=$!
snap() { find /tmp/wc -type f | sort > "$R/cache_$1.txt"; step "cache after $1: $(wc -l < "$R/cache_$1.txt") files"; }
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"; snap warmup
python3 -m mpi_em simulate --out /tmp/w64 --box 64 --n 600 --snr 0.2 --seed 11 > /dev/null 2>&1
python3 -m mpi_em refine3d --i /tmp/w64/particles.star --ref /tmp/w64/truth.mrc --ini-high 25 --iter 4 --max-order 3 \
  --local-from-order 3 --o /tmp/w64r > "$R/w64_refine3d.log" 2>&1; step "box-64 refine3d exit $?"; snap refine3d
python3 -m mpi_em class3d --i /tmp/w64/particles.star --ref /tmp/w64/truth.mrc --K 2 --iter 2 --zero-mask --o /tmp/w64z \
  > "$R/w64_zero_mask.log" 2>&1; step "box-64 class3d --zero-mask exit $?"; snap zero_mask
mkdir -p "$R/new_kernels"
comm -13 "$R/cache_warmup.txt" "$R/cache_zero_mask.txt" | while read f; do cp "$f" "$R/new_kernels/" 2>/dev/null; done
pack
wait $DP
md5sum /tmp/d256b/truth.mrc /tmp/d256b/start.mrc > "$R/md5.txt"
run256() {  # name, extra options
  mkdir -p /tmp/sbs_$1 && cp .dev/s2_class3d.json /tmp/sbs_$1/side_by_side.json
  CLASS_EXTRA="$2" SUMMARY=$R/box256-class3d-$1 PROGRAMS=mpi_em DATA=/tmp/d256b JOBS=class3d ITER=25 \
    TIMEOUT=100 timeout 130 bash benchmarks/relion_side_by_side_gpu.sh /tmp/sbs_$1 3000 256 > "$R/$1.log" 2>&1
  step "$1 exit $?"; pack
}
run256 zero-mask-no-reseed "--zero-mask --reseed-below 0"
run256 default ""
[ "$(el)" -lt 330 ] && run256 zero-mask "--zero-mask"
[ "$(el)" -lt 420 ] && { timeout 60 python3 benchmarks/map_statistics.py --gpu --json "$R/map_statistics.json" \
  > "$R/map_statistics.txt" 2>&1; step "map statistics exit $?"; }
[ "$(el)" -lt 440 ] && { timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_zero_mask.py \
  tests/test_likelihood.py 2>&1 | tail -12 > "$R/gpu_tests.txt"; step "gpu tests: $(tail -1 "$R/gpu_tests.txt")"; }
nvidia-smi --query-gpu=name,memory.used --format=csv >> "$R/steps.txt"
step end; pack
