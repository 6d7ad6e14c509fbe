#!/bin/bash
# GPU run AD (session 6; issue 4), one H200, main as committed (defaults --folds 4 --refine-offsets; a run stops
# with the iteration that converged):
#  1. the issue's benchmark: box 128, 50 000 particles, SNR 0.05, start = truth at 30 Å, auto-sampling to order 5,
#     launch/mpi-em-run -n 1, after a 3-iteration warm-up; N = the defaults, P = RELION's plain scheme
#     (--folds 1 --no-refine-offsets); the true poses' gold-standard resolution (mpi-em reconstruct) in the same run;
#     GEMM FLOP rates of the E-step from run_timings.json against DESIGN.md's ceilings (SGEMM 51, CGEMM 55 TFLOP/s).
#  2. the CI protocol (box 48, 1000 particles, SNR 0.25, truth start, max order 3), data seeds 2-4, as shipped
#     (converging), 2 ranks on the GPU, per-iteration diagnostics.
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session6_b.sh "$OUT" runAD
set -u
OUT=${1:-/tmp/out}; NAME=${2:-runAD}; . benchmarks/gpu_setup.sh; gpu_setup $NAME
D=/tmp/d128
[ -f $D/start.mrc ] || gpu_data $D 50000
run1() {  # output folder, iterations, options
  local out=$1 it=$2; shift 2
  timeout 200 launch/mpi-em-run -n 1 -- python3 -m mpi_em refine3d --i $D/particles_unaligned.star \
    --ref $D/start.mrc --ini-high 30 --o $out --device gpu --batch 1024 --max-order 5 --iter $it "$@" 2>&1
}
run1 /tmp/warm 3 >/dev/null
run1 /tmp/rN 25 | grep -E "iteration|finished" > $R/refine3d_N.log
run1 /tmp/rP 25 --folds 1 --no-refine-offsets | grep -E "iteration|finished" > $R/refine3d_P.log
timeout 100 launch/mpi-em-run -n 1 -- python3 -m mpi_em reconstruct --i $D/particles.star --o /tmp/known \
  --device gpu > $R/known.log 2>&1
for V in N P; do cp /tmp/r$V/run_timings.json $R/refine3d_${V}_timings.json; done
NAME=$NAME python3 - <<'PY' 2>&1 | tee $R/eval.txt
import json, os
import mrcfile, numpy as np
from mpi_em.evaluate import pose_errors
from mpi_em.fsc import fsc, resolution_at
t = mrcfile.read('/tmp/d128/truth.mrc')
k1, k2 = (mrcfile.read(f'/tmp/known/{n}') for n in ('half1.mrc', 'half2.mrc')) if os.path.exists('/tmp/known/half1.mrc') else (None, None)
known = resolution_at(fsc(k1, k2), 128, 1.5, 0.143) if k1 is not None else float('nan')
print('true poses (mpi-em reconstruct): gold-standard %.2f A' % known)
for V in ('N', 'P'):
    T = json.load(open(f'/tmp/r{V}/run_timings.json'))
    h1, h2 = (mrcfile.read(f'/tmp/r{V}/run_half{k}_class001_unfil.mrc') for k in (1, 2))
    rr = resolution_at(fsc(h1, h2), 128, 1.5, 0.143)
    mr = resolution_at(fsc(mrcfile.read(f'/tmp/r{V}/run_class001.mrc'), t), 128, 1.5, 0.5)
    a, s = pose_errors(f'/tmp/r{V}/run_data.star', '/tmp/d128/particles.star')
    comp = sum(r['seconds_iteration'] for r in T)
    wall = T[-1]['seconds_since_start'] - T[0]['seconds_since_start'] + T[0]['seconds_iteration']
    print('%s: %d iterations, %.1f s computation, %.1f s wall clock (iterations 2-%d: %.1f s); gold-standard %.2f A '
          '(%+.1f%% vs true poses), map vs truth %.2f A, median error %.2f deg, median shift error %.2f px'
          % (V, len(T), comp, wall, min(11, len(T)), sum(r['seconds_iteration'] for r in T[1:11]), rr,
             100 * (rr / known - 1), mr, np.median(a), np.median(s) / 1.5))
    print('   per iteration (s):', [round(r['seconds_iteration'], 2) for r in T])
    ph, fl = {}, {}
    for r in T:
        p = r['per_rank'][0]
        for k, v in p['seconds'].items():
            ph[k] = ph.get(k, 0.0) + v
        for k, v in p.get('flops', {}).items():
            fl[k] = fl.get(k, 0.0) + v
    print('   phases, all iterations (s):', {k: round(v, 2) for k, v in ph.items() if v > 0.05})
    est = sum(ph.get(k, 0) for k in ('read', 'prepare', 'coarse', 'fine', 'insert', 'stats'))
    for k in ('coarse', 'fine'):
        if ph.get(k):
            print('   %s: %.2e flop in %.2f s = %.1f TFLOP/s' % (k, fl.get(k, 0), ph[k], fl.get(k, 0) / ph[k] / 1e12))
    tot = fl.get('coarse', 0) + fl.get('fine', 0)
    print('   whole E-step (read..stats, %.2f s): %.1f TFLOP/s = %.0f%% of the CGEMM ceiling (55)'
          % (est, tot / est / 1e12, 100 * tot / est / 55e12))
PY
export MPI_EM_DEVICE=gpu
for s in 2 3 4; do
  echo "== CI protocol, data seed $s (as shipped)"
  PYTHON=python3 MPIRUN_OPTS="--bind-to none" DATA_SEED=$s timeout 120 bash benchmarks/refine3d_iterations.sh \
    /tmp/ci_s$s 48 1000 0.25 2.67 20 3 --batch 256 | tail -1
  timeout 60 python3 benchmarks/refine3d_diagnose.py /tmp/ci_s$s/d /tmp/ci_s$s/ref
done 2>&1 | tee $R/ci.txt
tar czf "$OUT/$NAME.tgz" -C /tmp $NAME
