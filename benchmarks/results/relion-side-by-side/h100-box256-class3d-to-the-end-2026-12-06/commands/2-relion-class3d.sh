#!/bin/bash
# command 2, right after command 1 on the same machine: RELION's box-256 class3d (PROGRAMS=relion), same data and --out
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup s2
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/s2.tgz" -C /tmp s2; }
step "set-up done"
ls /tmp/relion-gpu/bin/relion_refine_mpi /tmp/d256b/truth.mrc /tmp/sbs256c3/side_by_side.json >> "$R/steps.txt" 2>&1
SUMMARY=$R/box256-class3d PROGRAMS=relion DATA=/tmp/d256b JOBS=class3d ITER=25 TIMEOUT=550 timeout 585 \
  bash benchmarks/relion_side_by_side_gpu.sh /tmp/sbs256c3 3000 256 > "$R/class3d_relion.log" 2>&1; step "class3d relion exit $?"
ls -la --time-style=full-iso /tmp/sbs256c3/class3d/relion*/ 2>/dev/null | tail -30 > "$R/last_files.txt"
step "end"
pack
