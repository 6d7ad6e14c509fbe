#!/bin/bash
# class3d's direction prior (RELION's pdf_direction) at box 256: the new default and its controls on one H100/H200
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup z6
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/z6.tgz" -C /tmp z6; }
el() { echo $(( $(date +%s) - T0 )); }
step "set-up done"
( python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d256b --gpu --box 256 --n 3000 --snr 0.05 --apix 1.5 \
  > "$R/data.log" 2>&1; step "data exit $?" ) & DP=$!
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"
wait $DP
bench() {  # NAME CLASS_EXTRA
  mkdir -p /tmp/sbs_$1 && cp .dev/s2_class3d.json /tmp/sbs_$1/side_by_side.json
  CLASS_EXTRA="$2" SUMMARY=$R/box256-class3d-$1 PROGRAMS=mpi_em DATA=/tmp/d256b JOBS=class3d ITER=25 TIMEOUT=100 \
    timeout 130 bash benchmarks/relion_side_by_side_gpu.sh /tmp/sbs_$1 3000 256 > "$R/class3d_$1.log" 2>&1
  step "class3d $1 exit $?: $(grep -rh ', classes ' /tmp/sbs_$1 --include=*.log 2>/dev/null | tail -1 | grep -o 'classes.*')"
  pack
}
bench direction-prior ""
bench no-direction-prior "--no-direction-prior"
bench direction-prior-no-reseed "--reseed-below 0"
bench no-direction-prior-no-reseed "--no-direction-prior --reseed-below 0"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_direction_prior.py tests/test_gpu.py tests/test_likelihood.py \
  tests/test_zero_mask.py -k "not one_rank" 2>&1 | tail -12 > "$R/gpu_tests.txt"; step "gpu tests: $(tail -1 "$R/gpu_tests.txt")"
pack
[ "$(el)" -lt 420 ] && { timeout 160 python3 -m pytest -q -p no:cacheprovider tests/test_warmup.py -x 2>&1 | tail -30 > "$R/warmup_tests.txt"
  step "test_warmup: $(tail -1 "$R/warmup_tests.txt")"; }
step end; pack
