#!/bin/bash
# fresh machine: box-256 class3d (3000 particles) ours without re-seeding (--reseed-below 0, as RELION), then ours with
# the defaults again as a control; RELION's row kept from the earlier command's record
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup s4
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/s4.tgz" -C /tmp s4; }
el() { echo $(( $(date +%s) - T0 )); }
step "set-up done"
( python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d256b --gpu --box 256 --n 3000 --snr 0.05 --apix 1.5 \
  > "$R/data.log" 2>&1; step "data exit $?" ) & DP=$!
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"
wait $DP
md5sum /tmp/d256b/truth.mrc /tmp/d256b/start.mrc > "$R/md5.txt"
for o in /tmp/sbs_nr /tmp/sbs_def; do mkdir -p $o; cp .dev/s2_class3d.json $o/side_by_side.json; done
CLASS_EXTRA="--reseed-below 0" SUMMARY=$R/box256-class3d-no-reseed PROGRAMS=mpi_em DATA=/tmp/d256b JOBS=class3d ITER=25 \
  TIMEOUT=100 timeout 150 bash benchmarks/relion_side_by_side_gpu.sh /tmp/sbs_nr 3000 256 > "$R/no_reseed.log" 2>&1
step "no re-seeding exit $?"; pack
if [ "$(el)" -lt 190 ]; then
  SUMMARY=$R/box256-class3d-default PROGRAMS=mpi_em DATA=/tmp/d256b JOBS=class3d ITER=25 \
    TIMEOUT=100 timeout 110 bash benchmarks/relion_side_by_side_gpu.sh /tmp/sbs_def 3000 256 > "$R/default.log" 2>&1
  step "default exit $?"
fi
step end; pack
