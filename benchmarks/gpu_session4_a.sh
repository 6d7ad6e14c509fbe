#!/bin/bash
# GPU run N (session 4; issue 4): refine3d on one and on two H200s of one host (nvidia-h200-x2), the same data as
# run L (box 128, 50 000 particles, SNR 0.05, start = truth at 30 Å, auto-sampling up to order 5): seconds per
# iteration on 1 and 2 GPUs, same poses from both, gold-standard resolution vs the true poses; first the GPU
# kernel tests (tests/test_gpu.py: GPU = CPU) on the current code.
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session4_a.sh "$OUT"
# Run P: bash benchmarks/gpu_session4_a.sh "$OUT" runP warm -- the same after a 2-GPU warm-up run that compiles
# every kernel (CuPy's on-disk kernel cache), so that neither timed run pays compilation.
# Run R: bash benchmarks/gpu_session4_a.sh "$OUT" runR warm launcher -- as run P, no kernel tests, every run started
# by launch/mpi-em-run (CPU threads per rank = cores / ranks, each rank through launch/gpu-bind).
# Run S: bash benchmarks/gpu_session4_a.sh "$OUT" runS warm launcher lean -- as run R without the true-pose
# reconstruction and with a shorter warm-up (6 iterations: global and local kernels), for the last device minutes.
set -u
OUT=${1:-/tmp/out}; NAME=${2:-runN}; . benchmarks/gpu_setup.sh; gpu_setup $NAME
[ -n "${4:-}" ] || timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3 | tee $R/gpu_tests.txt
LAUNCHER=${4:-}
pre() { if [ -n "$LAUNCHER" ]; then echo "launch/mpi-em-run -n $1 --"; else echo "mpirun -n $1 --bind-to none"; fi; }
D=/tmp/d128
gpu_data $D 50000
LEAN=${5:-}; WARM_ITER=25; [ -z "$LEAN" ] || WARM_ITER=6   # lean: true-pose value from runs N-R (same data)
[ -n "$LEAN" ] || timeout 100 python3 -m mpi_em reconstruct --i $D/particles.star --o /tmp/known --device gpu 2>&1 \
  | tail -1 > $R/known.log
for P in ${3:+w} 1 2; do
  [ "$P" = w ] && { timeout 150 $(pre 2) python3 -m mpi_em refine3d --i $D/particles_unaligned.star \
    --ref $D/start.mrc --ini-high 30 --o /tmp/warm --device gpu --batch 1024 --max-order 5 --iter $WARM_ITER >/dev/null 2>&1;
    continue; }
  timeout 200 $(pre $P) python3 -m mpi_em refine3d --i $D/particles_unaligned.star \
    --ref $D/start.mrc --ini-high 30 --o /tmp/r$P --device gpu --batch 1024 --max-order 5 --iter 25 2>&1 \
    | grep -E "placement|rank|iteration|finished|converged" > $R/refine3d_P$P.log
  cp /tmp/r$P/run_timings.json $R/refine3d_P${P}_timings.json
done
python3 - <<'PY' 2>&1 | tee $R/eval.txt
import json, mrcfile, numpy as np
from mpi_em.evaluate import pose_errors
from mpi_em.fsc import fsc, resolution_at
from mpi_em.io import read_particles
t = mrcfile.read('/tmp/d128/truth.mrc')
import os
rk = json.load(open('/tmp/known/run.json'))['resolution_0143'] if os.path.exists('/tmp/known/run.json') else 4.74
for P in (1, 2):
    h1, h2 = (mrcfile.read(f'/tmp/r{P}/run_half{k}_class001_unfil.mrc') for k in (1, 2))
    rr = resolution_at(fsc(h1, h2), 128, 1.5, 0.143)
    mr = resolution_at(fsc(mrcfile.read(f'/tmp/r{P}/run_class001.mrc'), t), 128, 1.5, 0.5)
    a, s = pose_errors(f'/tmp/r{P}/run_data.star', '/tmp/d128/particles.star')
    print('%d GPU(s): gold-standard %.2f A (true poses %.2f A, %.0f%% worse), map vs truth %.2f A, median error %.2f deg, shift %.2f A'
          % (P, rr, rk, 100 * (rr / rk - 1), mr, np.median(a), np.median(s)))
a, b = read_particles('/tmp/r1/run_data.star'), read_particles('/tmp/r2/run_data.star')
pa = np.stack([a.rot, a.tilt, a.psi, a.origin_x, a.origin_y], 1); pb = np.stack([b.rot, b.tilt, b.psi, b.origin_x, b.origin_y], 1)
print('1 vs 2 GPUs: identical poses (1e-3) for %.4f of the particles' % np.all(np.abs(pa - pb) < 1e-3, axis=1).mean())
T = {P: json.load(open(f'/tmp/r{P}/run_timings.json')) for P in (1, 2)}
tot = {1: 0.0, 2: 0.0}
print('iter | 1 GPU: s (E-step, M-step) | 2 GPUs: s (E-step max rank, reduce, reconstruct) | ratio')
for i1, i2 in zip(T[1], T[2]):
    e1 = i1['per_rank'][0]['seconds_estep']; e2 = max(r['seconds_estep'] for r in i2['per_rank'])
    ph = lambda it, k: max(r['seconds'].get(k, 0) for r in it['per_rank'])
    print('%d | %.2f (%.2f, %.2f) | %.2f (%.2f, %.3f, %.2f) | %.2fx' % (i1['iteration'], i1['seconds_iteration'], e1,
          i1['seconds_iteration'] - e1, i2['seconds_iteration'], e2, ph(i2, 'reduce'), ph(i2, 'reconstruct'),
          i1['seconds_iteration'] / i2['seconds_iteration']))
    if i1['iteration'] > 1:
        tot[1] += i1['seconds_iteration']; tot[2] += i2['seconds_iteration']
print('iterations 2..%d: 1 GPU %.1f s, 2 GPUs %.1f s, %.2fx' % (min(len(T[1]), len(T[2])), tot[1], tot[2], tot[1] / tot[2]))
PY
tar czf "$OUT/$NAME.tgz" -C /tmp $NAME
