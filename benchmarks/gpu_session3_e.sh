#!/bin/bash
# GPU run L (session 3; issue 4's benchmark): refine3d to convergence on one H200 -- box 128, 50 000 particles,
# SNR 0.05 (run D's data), from the truth low-passed to 30 Å, auto-sampling up to HEALPix order 5 (local searches
# from order 4) -- against the known-pose reconstruction of the same particles: gold-standard resolutions (FSC
# 0.143) and maps vs truth (FSC 0.5), median angular error, seconds and E-step FLOP rate per iteration.
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session3_e.sh "$OUT"
set -u
OUT=${1:-/tmp/out}; . benchmarks/gpu_setup.sh; gpu_setup runL
D=/tmp/d128
gpu_data $D 50000
timeout 100 python3 -m mpi_em reconstruct --i $D/particles.star --o /tmp/known --device gpu 2>&1 | tail -1 > $R/known.log
timeout 420 python3 -m mpi_em refine3d --i $D/particles_unaligned.star --ref $D/start.mrc --ini-high 30 --o /tmp/ref \
  --device gpu --batch 1024 --max-order 5 --iter 25 2>&1 | grep -E "iteration|finished|converged" > $R/refine3d.log
cp /tmp/ref/run_timings.json $R/refine3d_timings.json; cp /tmp/known/run.json $R/known_run.json
cp /tmp/ref/run_model.star $R/refine3d_model.star 2>/dev/null
python3 - <<'PY' 2>&1 | tee $R/eval.txt
import json, mrcfile, numpy as np
from mpi_em.evaluate import pose_errors
from mpi_em.fsc import fsc, resolution_at
t = mrcfile.read('/tmp/d128/truth.mrc')
known = json.load(open('/tmp/known/run.json'))
rk = known['resolution_0143']
mk = resolution_at(fsc(mrcfile.read('/tmp/known/map.mrc'), t), 128, 1.5, 0.5)
h1, h2 = mrcfile.read('/tmp/ref/run_half1_class001_unfil.mrc'), mrcfile.read('/tmp/ref/run_half2_class001_unfil.mrc')
rr = resolution_at(fsc(h1, h2), 128, 1.5, 0.143)
mr = resolution_at(fsc(mrcfile.read('/tmp/ref/run_class001.mrc'), t), 128, 1.5, 0.5)
a, s = pose_errors('/tmp/ref/run_data.star', '/tmp/d128/particles.star')
print('gold-standard resolution (FSC 0.143 of the half maps): refined %.2f A, true poses %.2f A (%.0f%% worse)' % (rr, rk, 100 * (rr / rk - 1)))
print('map vs truth (FSC 0.5): refined %.2f A, true poses %.2f A' % (mr, mk))
print('median angular error %.2f deg, median shift error %.2f A' % (np.median(a), np.median(s)))
for r in json.load(open('/tmp/ref/run_timings.json')):
    p = r['per_rank'][0]; f = sum(p['flops'].values()); e = p['seconds_estep']
    print('iteration %d: %.2f s, E-step %.2f s, %.1f TFLOP/s' % (r['iteration'], r['seconds_iteration'], e, f / e / 1e12))
PY
tar czf "$OUT/runL.tgz" -C /tmp runL
