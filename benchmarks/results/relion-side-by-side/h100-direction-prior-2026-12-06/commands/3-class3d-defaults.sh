#!/bin/bash
# class3d's new defaults (direction prior, no re-seeding) against the previous ones, box 256 (25 it.) and box 128
# (5 it.), one machine; then the warmup test
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup z8
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/z8.tgz" -C /tmp z8; }
el() { echo $(( $(date +%s) - T0 )); }
step "set-up done"
( python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d256b --gpu --box 256 --n 3000 --snr 0.05 --apix 1.5 \
  > "$R/data.log" 2>&1; step "data 256 exit $?"
  python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d128 --gpu --box 128 --n 10000 --snr 0.05 --apix 1.5 \
  > "$R/data128.log" 2>&1; step "data 128 exit $?" ) & DP=$!
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"
wait $DP
bench() {  # NAME BOX N ITER RELION-JSON CLASS_EXTRA DATA
  mkdir -p /tmp/sbs_$1 && cp .dev/$5 /tmp/sbs_$1/side_by_side.json
  CLASS_EXTRA="$6" SUMMARY=$R/$1 PROGRAMS=mpi_em DATA=$7 JOBS=class3d ITER=$4 TIMEOUT=100 \
    timeout 130 bash benchmarks/relion_side_by_side_gpu.sh /tmp/sbs_$1 $3 $2 > "$R/$1.log" 2>&1
  step "$1 exit $?: $(grep -rh ', classes ' /tmp/sbs_$1 --include=*.log 2>/dev/null | tail -1 | grep -o 'classes.*')"
  pack
}
bench box256-class3d-new-default 256 3000 25 s2_class3d.json "" /tmp/d256b
bench box256-class3d-previous-default 256 3000 25 s2_class3d.json "--no-direction-prior --reseed-below 0.2" /tmp/d256b
bench box128-class3d-new-default 128 10000 5 c128.json "" /tmp/d128
bench box128-class3d-previous-default 128 10000 5 c128.json "--no-direction-prior --reseed-below 0.2" /tmp/d128
[ "$(el)" -lt 420 ] && { timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_warmup.py -x 2>&1 | tail -30 > "$R/warmup_tests.txt"
  step "test_warmup: $(tail -1 "$R/warmup_tests.txt")"; }
step end; pack
