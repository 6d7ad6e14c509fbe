#!/bin/bash
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup s3
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/s3.tgz" -C /tmp s3; }
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_warmup.py -x 2>&1 | tail -60 > "$R/warmup_tests.txt"; step "test_warmup: $(tail -1 "$R/warmup_tests.txt")"
pack
python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d128 --gpu --box 128 --n 10000 --snr 0.05 --apix 1.5 > "$R/data.log" 2>&1; step "data exit $?"
SUMMARY=$R/box128-refine3d DATA=/tmp/d128 JOBS=refine3d TIMEOUT=420 timeout 470 \
  bash benchmarks/relion_side_by_side_gpu.sh /tmp/sbs128r 10000 128 > "$R/refine3d.log" 2>&1; step "refine3d exit $?"
step end
pack
