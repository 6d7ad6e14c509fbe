#!/bin/bash
# GPU run T (session 5; issue 4), one H200 (the kind lent this session):
#  1. the background writer's effect on the wall clock: run S's 1-GPU protocol (box 128, 50 000 particles, SNR 0.05,
#     start = truth at 30 Å, auto-sampling to order 5, warm kernel cache, launch/mpi-em-run) with the outputs now
#     written in a background thread; wall clock per iteration from run_timings.json's seconds_since_start.
#  2. issue 4's monotonicity: the 10 000-particle seed-2 run of run O (box 48, SNR 0.25, truth start) and variants,
#     2 ranks on the one GPU, per-iteration diagnostics (benchmarks/refine3d_diagnose.py).
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session5_a.sh "$OUT" [runT] [part]
# Run U (after the translations follow the angular sampling): RUN_T2=1 bash benchmarks/gpu_session5_a.sh "$OUT" runU
set -u
OUT=${1:-/tmp/out}; NAME=${2:-runT}; PART=${3:-all}; . benchmarks/gpu_setup.sh; gpu_setup $NAME
export MPI_EM_DEVICE=gpu
if [ "$PART" = all ] || [ "$PART" = 1 ]; then
  D=/tmp/d128
  gpu_data $D 50000
  run1() {  # output folder, iterations
    timeout 200 launch/mpi-em-run -n 1 -- python3 -m mpi_em refine3d --i $D/particles_unaligned.star \
      --ref $D/start.mrc --ini-high 30 --o $1 --device gpu --batch 1024 --max-order 5 --iter $2 2>&1
  }
  run1 /tmp/warm 6 >/dev/null
  run1 /tmp/r1 25 | grep -E "placement|rank|iteration|finished|converged" > $R/refine3d_P1.log
  cp /tmp/r1/run_timings.json $R/refine3d_P1_timings.json
  python3 - <<'PY' 2>&1 | tee $R/eval.txt
import json
T = json.load(open('/tmp/r1/run_timings.json'))
print('iter | compute (s) | wall clock (s) | between iterations (s)')
for a, b in zip(T, T[1:]):
    w = b['seconds_since_start'] - a['seconds_since_start']
    print('%d | %.2f | %.2f | %.2f' % (b['iteration'], b['seconds_iteration'], w, w - b['seconds_iteration']))
last = min(len(T), 11)
c = sum(r['seconds_iteration'] for r in T[1:last]); w = T[last - 1]['seconds_since_start'] - T[0]['seconds_since_start']
print('iterations 2..%d: compute %.1f s, wall clock %.1f s (run S, writing in the foreground: 20.5 s, ~31 s)' % (last, c, w))
print('all %d iterations: compute %.1f s, wall clock %.1f s' % (len(T), sum(r['seconds_iteration'] for r in T),
      T[-1]['seconds_since_start'] - T[0]['seconds_since_start'] + T[0]['seconds_iteration']))
import mrcfile, numpy as np
from mpi_em.evaluate import pose_errors
from mpi_em.fsc import fsc, resolution_at
h1, h2 = (mrcfile.read(f'/tmp/r1/run_half{k}_class001_unfil.mrc') for k in (1, 2))
rr = resolution_at(fsc(h1, h2), 128, 1.5, 0.143)
mr = resolution_at(fsc(mrcfile.read('/tmp/r1/run_class001.mrc'), mrcfile.read('/tmp/d128/truth.mrc')), 128, 1.5, 0.5)
a, s = pose_errors('/tmp/r1/run_data.star', '/tmp/d128/particles.star')
print('gold-standard %.2f A (true poses 4.74 A: %.0f%% worse; run S 4.84 A), map vs truth %.2f A, median error %.2f deg, '
      'median shift error %.2f A (%.2f px)' % (rr, 100 * (rr / 4.74 - 1), mr, np.median(a), np.median(s), np.median(s) / 1.5))
PY
cat $R/refine3d_P1.log
fi
if [ "$PART" = all ] || [ "$PART" = 2 ]; then
  # a copy whose convergence never stops the run (the diagnostic needs the iterations after the peak)
  rm -rf /tmp/nc && mkdir /tmp/nc && cp -r mpi_em benchmarks /tmp/nc/
  sed -i 's/if state\["no_improve"\] >= 1:/if state["no_improve"] >= 99:/' /tmp/nc/mpi_em/jobs/em.py
  grep -q 'no_improve"\] >= 99' /tmp/nc/mpi_em/jobs/em.py || { echo "patch failed"; exit 1; }
  variant() {  # name, iterations, refine3d options... (CODE=/tmp/nc: never converges; CODE=$PWD: as shipped)
    local name=$1 it=$2 code=${CODE:-/tmp/nc}; shift 2
    echo "== $name (seed ${SEED:-2}, ${N:-10000} particles, $* ${code})"
    (cd $code && PYTHONPATH=/tmp/site:$code PYTHON=python3 MPIRUN_OPTS="--bind-to none" DATA_SEED=${SEED:-2} \
      timeout 150 bash benchmarks/refine3d_iterations.sh /tmp/v_$name 48 ${N:-10000} 0.25 2.67 $it 3 --batch 256 "$@" \
      | tail -1)
    (cd $code && PYTHONPATH=/tmp/site:$code timeout 200 python3 benchmarks/refine3d_diagnose.py /tmp/v_$name/d \
      /tmp/v_$name/ref ${HARD:-})
  }
  {
    if [ -z "${RUN_T2:-}" ]; then   # run T, part 2 (main at ce6a3b2: fixed translations)
      HARD=--hard variant default 12
      variant nsel16 12 --n-select 16
      variant step05 12 --offset-step 0.5
      variant noperturb 12 --perturb 0
      variant nsel64 12 --n-select 64
    else                            # run U: translations refined with the angles (RELION's rule)
      variant adaptive 12
      for SEED in 2 3 4; do N=1000 CODE=$PWD variant ci_s$SEED 9; done
      SEED=3 variant adaptive_s3 12
    fi
  } 2>&1 | tee $R/diagnose.txt
fi
tar czf "$OUT/$NAME.tgz" -C /tmp $NAME
