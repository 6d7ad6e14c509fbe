#!/bin/bash
# GPU run C (issues 4, 5, 7): GPU tests; one-GPU phases and E-step GEMM rate of refine3d/class2d/reconstruct
# (box 128, 50k); TF32 vs FP32 GEMMs in refine3d (4 iterations, resolution vs truth); class2d 100k K=100 after the
# first-pass fix and the fused 2D kernels. Everything ends in one tarball (the device tool returns few files).
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session2_c.sh "$OUT"
set -u
OUT=${1:-/tmp/out}; R=/tmp/runC; mkdir -p "$OUT" $R
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
nvidia-smi -L > $R/device.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fourier.py tests/test_fourier2d.py \
  tests/test_codec.py 2>&1 | tail -3 | tee $R/gpu_tests.txt
D=/tmp/d128
timeout 120 python3 -m mpi_em simulate --out $D --box 128 --n 100000 --snr 0.05 --apix 1.5 --per-stack 5000 --seed 11 2>&1 | tail -1
python3 - <<'PY'
import mrcfile, numpy as np, starfile
from mpi_em.em.model import lowpass
v = mrcfile.read('/tmp/d128/truth.mrc').astype(np.float64)
with mrcfile.new('/tmp/d128/start.mrc', overwrite=True) as m:
    m.set_data(lowpass(v, 128, 1.5, 30.0).astype(np.float32)); m.voxel_size = 1.5
for name in ('particles', 'particles_unaligned'):
    b = starfile.read(f'/tmp/d128/{name}.star', always_dict=True); b['particles'] = b['particles'].iloc[:50000]
    starfile.write(b, f'/tmp/d128/p50k_{name}.star', float_format=None)
PY
timeout 150 python3 benchmarks/scaling/scaling.py --box 128 --apix 1.5 --n 50000 --ranks 1 --device gpu --K 100 \
  --batch 1024 --data $D --out $R/scaling 2>&1 | grep -v "^+" | tail -22
timeout 60 python3 -m mpi_em reconstruct --i $D/p50k_particles.star --o /tmp/known --device gpu --batch 1024 2>&1 | tail -1
for tf in 0 1; do
  CUPY_TF32=$tf timeout 120 python3 -m mpi_em refine3d --i $D/p50k_particles_unaligned.star --ref $D/start.mrc \
    --ini-high 30 --o /tmp/ref_tf$tf --device gpu --batch 1024 --max-order 3 --iter 4 2>&1 | grep -E "iteration|finished" | tee $R/refine3d_tf32_$tf.log
  cp /tmp/ref_tf$tf/run_timings.json $R/refine3d_tf32_${tf}_timings.json 2>/dev/null
done
python3 - <<'PY' 2>&1 | tee $R/tf32_eval.txt
import mrcfile, numpy as np
from mpi_em.evaluate import pose_errors
from mpi_em.fsc import fsc, resolution_at
t = mrcfile.read('/tmp/d128/truth.mrc')
k = mrcfile.read('/tmp/known/map.mrc')
print('true poses: map vs truth FSC 0.5 %.2f A' % resolution_at(fsc(k, t), 128, 1.5, 0.5))
for tf in (0, 1):
    m = mrcfile.read(f'/tmp/ref_tf{tf}/run_class001.mrc')
    a, _ = pose_errors(f'/tmp/ref_tf{tf}/run_data.star', '/tmp/d128/p50k_particles.star')
    print(f'CUPY_TF32={tf}: map vs truth FSC 0.5 %.2f A, median angular error %.2f deg' % (resolution_at(fsc(m, t), 128, 1.5, 0.5), np.median(a)))
PY
timeout 150 python3 -m mpi_em class2d --i $D/particles_unaligned.star --o /tmp/c2d --K 100 --iter 2 --device gpu \
  --batch 1024 2>&1 | grep -v inserted | tee $R/class2d_100k_K100.log | tail -4
cp /tmp/c2d/run_timings.json $R/class2d_100k_K100_timings.json 2>/dev/null
tar czf "$OUT/runC.tgz" -C /tmp runC
