#!/bin/bash
# GPU run D (issues 4, 6, 7, 8): GEMM ceilings in the same run; one-GPU phases after a warm-up (kernel compilation
# untimed); refine3d FP32 vs TF32 GEMMs with a warm kernel cache; class3d 50k K=4 after the classification work.
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session2_d.sh "$OUT"
set -u
OUT=${1:-/tmp/out}; R=/tmp/runD; mkdir -p "$OUT" $R
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
nvidia-smi -L > $R/device.txt
timeout 60 python3 benchmarks/gemm_ceiling.py --json $R/gemm_ceiling.json 2>&1 | tail -6
D=/tmp/d128
timeout 120 python3 -m mpi_em simulate --out $D --box 128 --n 50000 --snr 0.05 --apix 1.5 --per-stack 5000 --seed 11 2>&1 | tail -1
python3 - <<'PY'
import mrcfile, numpy as np
from mpi_em.em.model import lowpass
v = mrcfile.read('/tmp/d128/truth.mrc').astype(np.float64)
with mrcfile.new('/tmp/d128/start.mrc', overwrite=True) as m:
    m.set_data(lowpass(v, 128, 1.5, 30.0).astype(np.float32)); m.voxel_size = 1.5
PY
timeout 200 python3 benchmarks/scaling/scaling.py --box 128 --apix 1.5 --n 50000 --ranks 1 --device gpu --K 100 \
  --batch 1024 --warmup --data $D --out $R/scaling 2>&1 | grep -v "^+" | tail -12
for tf in 0 1 0; do
  CUPY_TF32=$tf timeout 100 python3 -m mpi_em refine3d --i $D/particles_unaligned.star --ref $D/start.mrc \
    --ini-high 30 --o /tmp/ref_tf$tf --device gpu --batch 1024 --max-order 3 --iter 5 2>&1 | grep -E "iteration|finished" > $R/refine3d_tf32_$tf.log
  cp /tmp/ref_tf$tf/run_timings.json $R/refine3d_tf32_${tf}_timings.json 2>/dev/null
  python3 - $tf <<'PY' 2>&1 | tee -a $R/tf32_eval.txt
import sys, mrcfile, numpy as np
from mpi_em.evaluate import pose_errors
from mpi_em.fsc import fsc, resolution_at
tf = sys.argv[1]
t = mrcfile.read('/tmp/d128/truth.mrc')
m = mrcfile.read(f'/tmp/ref_tf{tf}/run_class001.mrc')
a, _ = pose_errors(f'/tmp/ref_tf{tf}/run_data.star', '/tmp/d128/particles.star')
print(f'CUPY_TF32={tf}: map vs truth FSC 0.5 %.2f A, median angular error %.2f deg' % (resolution_at(fsc(m, t), 128, 1.5, 0.5), np.median(a)))
PY
done
timeout 100 python3 -m mpi_em class3d --i $D/particles_unaligned.star --ref $D/start.mrc --ini-high 30 --o /tmp/c3d \
  --K 4 --iter 3 --device gpu --batch 1024 2>&1 | grep -v inserted > $R/class3d_50k_K4.log; tail -4 $R/class3d_50k_K4.log
cp /tmp/c3d/run_timings.json $R/class3d_50k_K4_timings.json 2>/dev/null
tar czf "$OUT/runD.tgz" -C /tmp runD
