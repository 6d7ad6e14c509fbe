#!/bin/bash
# the warmup test (large-box job on 200 particles), GPU tests, box-256 class3d with the new default (--zero-mask on)
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup z4
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/z4.tgz" -C /tmp z4; }
el() { echo $(( $(date +%s) - T0 )); }
step "set-up done"
( python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d256b --gpu --box 256 --n 3000 --snr 0.05 --apix 1.5 \
  > "$R/data.log" 2>&1; step "data exit $?" ) & DP=$!
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_warmup.py -x 2>&1 | tail -30 > "$R/warmup_tests.txt"
step "test_warmup: $(tail -1 "$R/warmup_tests.txt")"; pack
wait $DP
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"
mkdir -p /tmp/sbs_d && cp .dev/s2_class3d.json /tmp/sbs_d/side_by_side.json
SUMMARY=$R/box256-class3d-new-default PROGRAMS=mpi_em DATA=/tmp/d256b JOBS=class3d ITER=25 TIMEOUT=100 timeout 130 \
  bash benchmarks/relion_side_by_side_gpu.sh /tmp/sbs_d 3000 256 > "$R/class3d.log" 2>&1; step "class3d exit $?"; pack
[ "$(el)" -lt 430 ] && { timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_likelihood.py \
  tests/test_zero_mask.py -k "not one_rank" 2>&1 | tail -12 > "$R/gpu_tests.txt"; step "gpu tests: $(tail -1 "$R/gpu_tests.txt")"; }
step end; pack
