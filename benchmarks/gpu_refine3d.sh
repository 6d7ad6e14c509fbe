#!/bin/bash
# refine3d on one GPU: simulated box-96 data set (SNR 0.05, CTF), from the truth low-passed to 1/4 Nyquist.
# Run on the lent GPU machine from the repo root with the device wheels in .whl/:  bash benchmarks/gpu_refine3d.sh "$OUT"
set -u
OUT=${1:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
N=${N:-20000}; BOX=${BOX:-96}; APIX=${APIX:-2.0}
nvidia-smi -L | tee "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fourier.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
python3 -m mpi_em simulate --out /tmp/ds --box $BOX --n $N --snr 0.05 --apix $APIX --per-stack 5000 2>&1 | tail -1
python3 - <<PY
import mrcfile, numpy as np
from mpi_em.em.model import lowpass
v = mrcfile.read('/tmp/ds/truth.mrc').astype(np.float64)
with mrcfile.new('/tmp/ds/start.mrc', overwrite=True) as m:
    m.set_data(lowpass(v, $BOX, $APIX, 8 * $APIX).astype(np.float32)); m.voxel_size = $APIX
PY
python3 -m mpi_em reconstruct --i /tmp/ds/particles.star --o /tmp/ds/known --device gpu 2>&1 | tail -1 | tee "$OUT/known_poses.txt"
/usr/bin/time -f "wall %e s, max RSS %M kB" python3 -m mpi_em refine3d --i /tmp/ds/particles_unaligned.star \
  --ref /tmp/ds/start.mrc --ini-high $(python3 -c "print(8*$APIX)") --o /tmp/ds/ref --device gpu --batch 512 \
  --max-order 3 --iter ${ITER:-6} 2>&1 | tee "$OUT/refine3d_gpu.log"
python3 - <<PY 2>&1 | tee "$OUT/refine3d_eval.txt"
import glob, mrcfile, numpy as np
from mpi_em.evaluate import pose_errors
from mpi_em.fsc import fsc, resolution_at
t = mrcfile.read('/tmp/ds/truth.mrc')
for f in sorted(glob.glob('/tmp/ds/ref/run_it*_data.star')):
    a, s = pose_errors(f, '/tmp/ds/particles.star'); print(f.split('/')[-1], 'median angular error %.2f deg' % np.median(a))
for f in ['/tmp/ds/ref/run_class001.mrc', '/tmp/ds/known/map.mrc']:
    try: print(f, 'map vs truth FSC 0.5: %.2f A' % resolution_at(fsc(mrcfile.read(f), t), $BOX, $APIX, 0.5))
    except Exception as e: print(f, e)
PY
cp /tmp/ds/ref/run_fsc.png "$OUT/refine3d_fsc.png" 2>/dev/null; cp /tmp/ds/ref/run_model.star "$OUT/" 2>/dev/null
if [ -n "${CLASS2D:-}" ]; then
  /usr/bin/time -f "wall %e s, max RSS %M kB" python3 -m mpi_em class2d --i /tmp/ds/particles_unaligned.star --o /tmp/ds/c2d \
    --K $CLASS2D --iter 3 --device gpu --batch 512 2>&1 | tee "$OUT/class2d_gpu.log"
  cp /tmp/ds/c2d/run_classes.png "$OUT/class2d_classes.png" 2>/dev/null
fi
