#!/bin/bash
# zero mask, second command: warmup test (any() block sizes, --zero-mask case), box-256 class3d --zero-mask (defaults),
# box-128 refine3d and box-256 class2d with and without --zero-mask; RELION rows kept from their earlier records
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup z2
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/z2.tgz" -C /tmp z2; }
el() { echo $(( $(date +%s) - T0 )); }
step "set-up done"
mk() { python3 benchmarks/relion_side_by_side.py --data-only --data "$1" --gpu --box "$2" --n "$3" --snr 0.05 --apix 1.5 \
       > "$R/data_$2_$3.log" 2>&1; step "data $2 $3 exit $?"; }
( mk /tmp/d256b 256 3000; mk /tmp/d128 128 10000; mk /tmp/d256 256 4000 ) & DP=$!
( timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_warmup.py -x 2>&1 | tail -40 > "$R/warmup_tests.txt"
  step "test_warmup: $(tail -1 "$R/warmup_tests.txt")" ) & WP=$!
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"
wait $DP; wait $WP; pack
md5sum /tmp/d256b/truth.mrc /tmp/d256b/start.mrc /tmp/d128/truth.mrc /tmp/d256/truth.mrc > "$R/md5.txt"
sbs() {  # name, record JSON, data, n, box, jobs, extra-variable assignment
  mkdir -p /tmp/sbs_$1 && cp "$2" /tmp/sbs_$1/side_by_side.json
  env "$7" SUMMARY=$R/$1 PROGRAMS=mpi_em DATA=$3 JOBS=$6 ITER=25 TIMEOUT=100 timeout 130 \
    bash benchmarks/relion_side_by_side_gpu.sh /tmp/sbs_$1 $4 $5 > "$R/$1.log" 2>&1
  step "$1 exit $?"; pack
}
C2J=benchmarks/results/relion-side-by-side/h100-classes-25-iterations-2026-12-06/box256-class2d/side_by_side.json
sbs box256-class3d-zero-mask .dev/s2_class3d.json /tmp/d256b 3000 256 class3d "CLASS_EXTRA=--zero-mask"
sbs box128-refine3d-zero-mask .dev/refine128.json /tmp/d128 10000 128 refine3d "REFINE_EXTRA=--zero-mask"
sbs box128-refine3d-default .dev/refine128.json /tmp/d128 10000 128 refine3d "REFINE_EXTRA="
[ "$(el)" -lt 430 ] && sbs box256-class2d-zero-mask $C2J /tmp/d256 4000 256 class2d "CLASS_EXTRA=--zero-mask"
[ "$(el)" -lt 480 ] && sbs box256-class2d-default $C2J /tmp/d256 4000 256 class2d "CLASS_EXTRA="
[ "$(el)" -lt 500 ] && { timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_zero_mask.py -k "not one_rank" \
  2>&1 | tail -15 > "$R/zero_mask_tests.txt"; step "zero-mask tests: $(tail -1 "$R/zero_mask_tests.txt")"; }
step end; pack
