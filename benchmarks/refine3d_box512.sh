#!/bin/bash
# refine3d at box 512 to convergence within a 24 GB card's memory, on one GPU (issue 19's target): $N = 20 000
# simulated particles (box 512, 1.0 Å/px, SNR 0.05, CTF, seed 11), start = the truth low-passed to 30 Å, one rank,
# defaults (the automatic sampling, a last iteration at the full image size) with --max-memory 22.3G (= 23.9e9 bytes).
# Peak = nvidia-smi's memory.used of the whole device every 0.5 s. At the end the known-pose reconstruction of the
# same particles and benchmarks/refine3d_eval.py (gold-standard and map-vs-truth resolution, pose errors, seconds
# per iteration). BOX, N, DEVICE (gpu) and MAX_MEMORY (22.3G) change the job (a CPU check of the script:
# BOX=48 N=300 DEVICE=cpu MAX_MEMORY=4G); ITER the most iterations (refine3d's default 20; also when continued),
# EXTRA more refine3d options.
#
# One command may not hold the whole job: each call works until BUDGET seconds (default 570) have passed and is
# then stopped; the next call on the same machine continues it (`mpi-em refine3d --continue`, from the last finished
# iteration: the unfinished one is lost). Every call packs what there is into OUT/refine3d-box512.tgz.
#   BUDGET=570 bash benchmarks/refine3d_box512.sh OUT      # repo root on the GPU machine, wheels in .whl/; repeat
set -u
T0=$(date +%s); END=$((T0 + ${BUDGET:-570}))
left() { echo $((END - $(date +%s))); }
OUT=${1:-/tmp/out}; . benchmarks/gpu_setup.sh; gpu_setup refine3d-box512
B=${BOX:-512}; DEV=${DEVICE:-gpu}; MEM=${MAX_MEMORY:-22.3G}
D=/tmp/b$B; J=/tmp/b$B/refine; K=/tmp/b$B/known
CALL=$(( $(ls $R/steps_*.txt 2>/dev/null | wc -l) + 1 ))
step() { echo "== $(( $(date +%s) - T0 )) s: $1" | tee -a "$R/steps_$CALL.txt"; }
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$R/memory_used_MiB_$CALL.txt" &
SMI=$!
if [ ! -f $D/start.mrc ]; then
  step "data: ${N:-20000} particles, box $B"
  BOX=$B APIX=1.0 LOWPASS=30 PER_STACK=1000 SIM_TIMEOUT=$(left) gpu_data $D "${N:-20000}"
fi
if [ ! -f $J/run_model.star ]; then
  if [ -f $J/checkpoint.json ]; then
    step "refine3d continued"
    args=(--continue $J ${ITER:+--iter $ITER})
  else
    step "refine3d"
    args=(--i $D/particles_unaligned.star --ref $D/start.mrc --ini-high 30 --o $J --device $DEV --max-memory $MEM ${ITER:+--iter $ITER} ${EXTRA:-})
  fi
  # the device's 64 GB disk holds the images (21 GB) and ~25 iterations' maps (1.5 GB each): the maps of all but
  # the last KEEP (default 3) iterations are removed while the job runs
  (while sleep 5; do ls $J/run_it*_model.star 2>/dev/null | head -n -"${KEEP:-3}" | sed 's/_model.star$//' |
     while read -r p; do rm -f "$p"_*; done; done) &
  CLEAN=$!
  timeout "$(( $(left) - 45 ))" python3 -m mpi_em refine3d "${args[@]}" > "$R/refine3d_$CALL.log" 2>&1
  echo "exit $?" >> "$R/refine3d_$CALL.log"
  kill $CLEAN 2>/dev/null
  grep -E "iteration|converged|final|memory|refused|Error" "$R/refine3d_$CALL.log" | tail -n 40
  cp $J/run.json $J/run_timings.json $J/checkpoint.json "$R/" 2>/dev/null
fi
if [ -f $J/run_model.star ] && [ ! -f $R/eval.txt ] && [ "$(left)" -gt 120 ]; then
  step "known-pose reconstruction"
  [ -f $K/run.json ] || timeout "$(( $(left) - 60 ))" python3 -m mpi_em reconstruct --i $D/particles.star --o $K \
    --device $DEV --max-memory $MEM > "$R/known.log" 2>&1
  step "evaluation"
  timeout "$(( $(left) - 10 ))" python3 benchmarks/refine3d_eval.py $D box512=$J \
    $([ -f $K/run.json ] && echo --known $K) > "$R/eval.txt" 2>&1
  cp $J/run_model.star $J/run_fsc.png "$R/" 2>/dev/null
  cat "$R/eval.txt"
fi
kill $SMI 2>/dev/null
step "peak this call: $(sort -n "$R/memory_used_MiB_$CALL.txt" | tail -n 1) MiB"
gpu_pack
