#!/bin/bash
# box-128 class3d (10 000 particles, 5 it.) with and without --zero-mask on one machine; the warmup test
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup z9
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/z9.tgz" -C /tmp z9; }
step "set-up done"
( python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d128 --gpu --box 128 --n 10000 --snr 0.05 --apix 1.5 \
  > "$R/data128.log" 2>&1; step "data 128 exit $?" ) & DP=$!
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"
wait $DP
bench() {  # NAME CLASS_EXTRA
  mkdir -p /tmp/sbs_$1 && cp .dev/c128.json /tmp/sbs_$1/side_by_side.json
  CLASS_EXTRA="$2" SUMMARY=$R/$1 PROGRAMS=mpi_em DATA=/tmp/d128 JOBS=class3d ITER=5 TIMEOUT=100 \
    timeout 130 bash benchmarks/relion_side_by_side_gpu.sh /tmp/sbs_$1 10000 128 > "$R/$1.log" 2>&1
  step "$1 exit $?: $(grep -rh ', classes ' /tmp/sbs_$1 --include=*.log 2>/dev/null | tail -1 | grep -o 'classes.*')"
  pack
}
bench box128-class3d-default ""
bench box128-class3d-no-zero-mask "--no-zero-mask"
timeout 260 python3 -m pytest -q -p no:cacheprovider tests/test_warmup.py -x 2>&1 | tail -30 > "$R/warmup_tests.txt"
step "test_warmup: $(tail -1 "$R/warmup_tests.txt")"
step end; pack
