#!/bin/bash
# GPU run V (session 5; issue 4): A/B/C on one H200, the same machine and data (run S's protocol: box 128, 50 000
# particles, SNR 0.05, start = truth at 30 Å, auto-sampling to order 5, launch/mpi-em-run -n 1, warm kernel cache):
#   A = main before the translational sampling followed the angular one (fixed 1 px fine / 2 px coarse steps),
#   B = main (translations refined with the angles, RELION's rule),
#   C = B with rank 0 writing each iteration's files in the main thread (no background writer).
# A and C are code trees in .ab/ (git-ignored), carried to the device (run's carry: .whl, .ab), made by
#   mkdir -p .ab/A .ab/C && git archive 88763bb mpi_em | tar -x -C .ab/A && git archive fd0d1e3 mpi_em | tar -x -C .ab/C
#   sed -i 's/writer.submit(_write_outputs, /_write_outputs(/' .ab/C/mpi_em/jobs/em.py
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session5_b.sh "$OUT" runW
# (run V, the first try, ran B three times: `python -m mpi_em` imported the repo root's package from the cwd)
# Run X: VARIANTS="S P" bash benchmarks/gpu_session5_b.sh "$OUT" runX -- S = main with the files written in the
# main thread (.ab/S: git archive 0b0ce4f + the same sed), P = main at 0b0ce4f (a forked writer process).
# Run Y: VARIANTS="D R" WARM_ITER=3 bash benchmarks/gpu_session5_b.sh "$OUT" runY -- D = main (zero-variance prior
# where tau2 = 0; fixed translations by default), R = main with --refine-offsets.
set -u
OUT=${1:-/tmp/out}; NAME=${2:-runW}; . benchmarks/gpu_setup.sh; gpu_setup $NAME
D=/tmp/d128
gpu_data $D 50000
REPO=$PWD
run1() {  # code tree, output folder, iterations, options (run from the code tree: `python -m` imports from the cwd)
  local code=$1 out=$2 it=$3; shift 3
  (cd $code && PYTHONPATH=/tmp/site:$code timeout 200 $REPO/launch/mpi-em-run -n 1 -- python3 -m mpi_em refine3d \
    --i $D/particles_unaligned.star --ref $D/start.mrc --ini-high 30 --o $out --device gpu --batch 1024 \
    --max-order 5 --iter $it "$@" 2>&1)
}
run1 $PWD /tmp/warm ${WARM_ITER:-6} >/dev/null
for V in ${VARIANTS:-A B C}; do
  code=$PWD; [ -d .ab/$V ] && code=$PWD/.ab/$V
  opts=(); [ $V = R ] && opts=(--refine-offsets)   # R: main with --refine-offsets
  run1 $code /tmp/r$V 12 "${opts[@]}" | grep -E "iteration|finished" > $R/refine3d_$V.log
  cp /tmp/r$V/run_timings.json $R/refine3d_${V}_timings.json
done
NAME=$NAME VARIANTS="${VARIANTS:-A B C}" python3 - <<'PY' 2>&1 | tee $R/eval.txt
import json, os, re
NAME = os.environ['NAME']
import mrcfile, numpy as np
from mpi_em.evaluate import pose_errors
from mpi_em.fsc import fsc, resolution_at
t = mrcfile.read('/tmp/d128/truth.mrc')
for V in os.environ.get('VARIANTS', 'A B C').split():
    T = json.load(open(f'/tmp/r{V}/run_timings.json'))
    c = sum(r['seconds_iteration'] for r in T[1:11])
    w = T[10]['seconds_since_start'] - T[0]['seconds_since_start'] if len(T) > 10 else float('nan')
    lines = open(f'/tmp/{NAME}/refine3d_{V}.log').read().splitlines()
    stamps = [l.split()[0] for l in lines if ' iteration ' in l]
    h1, h2 = (mrcfile.read(f'/tmp/r{V}/run_half{k}_class001_unfil.mrc') for k in (1, 2))
    rr = resolution_at(fsc(h1, h2), 128, 1.5, 0.143)
    mr = resolution_at(fsc(mrcfile.read(f'/tmp/r{V}/run_class001.mrc'), t), 128, 1.5, 0.5)
    a, s = pose_errors(f'/tmp/r{V}/run_data.star', '/tmp/d128/particles.star')
    print('%s: %d iterations; iterations 2-11 compute %.1f s, wall clock %.1f s (log %s..%s); gold-standard %.2f A, '
          'map vs truth %.2f A, median error %.2f deg, median shift error %.2f px'
          % (V, len(T), c, w, stamps[0], stamps[min(10, len(stamps) - 1)], rr, mr, np.median(a), np.median(s) / 1.5))
    ph = {}
    for r in T[1:11]:
        for k, v in r['per_rank'][0]['seconds'].items():
            ph[k] = ph.get(k, 0.0) + v
    print('   phases, iterations 2-11 (s):', {k: round(v, 2) for k, v in ph.items() if v > 0.05})
    print('   per iteration (s):', [round(r['seconds_iteration'], 2) for r in T])
PY
tar czf "$OUT/$NAME.tgz" -C /tmp $NAME
