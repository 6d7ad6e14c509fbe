#!/bin/bash
# GPU run A (issues 3 and 7): GPU tests, insertion/projection kernels vs the stencil path with the scatter-add
# ceilings of the same run, the symmetry anchor, the codec on the GPU, box-256 reconstruct 1 vs 2 ranks.
# From the repo root on the device, wheels of ../shared/tools/device-wheels in .whl/:  bash benchmarks/gpu_session2_a.sh "$OUT"
set -u
OUT=${1:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
{ nvidia-smi -L; python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)";
  ompi_info --parsable --all 2>/dev/null | grep -m1 mpi_built_with_cuda_support:value;
  python3 -c "from cupy.cuda import nccl; print('nccl', nccl.get_version())" 2>&1 | tail -1; } | tee "$OUT/device.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fourier.py tests/test_fourier2d.py tests/test_codec.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
timeout 150 python3 benchmarks/bench_insert.py --device gpu --box 64 128 256 --project --anchor-n 100000 --json "$OUT/insert_gpu.json" 2>&1 | tee "$OUT/insert_gpu.txt"
timeout 100 python3 benchmarks/bench_codec.py --np 128 256 --device gpu --json "$OUT/codec_gpu.json" 2>&1 | tee "$OUT/codec_gpu.txt"
timeout 100 python3 -m mpi_em simulate --out /tmp/d256 --box 256 --n 10000 --snr 0.05 --apix 1.0 --per-stack 2000 2>&1 | tail -1
for P in 1 2; do
  timeout 90 mpirun -n $P --oversubscribe python3 -m mpi_em reconstruct --i /tmp/d256/particles.star --o /tmp/d256/rec$P --device gpu --batch 1024 2>&1 | grep -v inserted | tee -a "$OUT/reconstruct256.txt"
  cp /tmp/d256/rec$P/run.json "$OUT/reconstruct256_P$P.json"
done
python3 - <<'PY' 2>&1 | tee -a "$OUT/reconstruct256.txt"
import mrcfile, numpy as np
a = mrcfile.read('/tmp/d256/rec1/map.mrc'); b = mrcfile.read('/tmp/d256/rec2/map.mrc')
print('box 256: 2 ranks on the one GPU vs 1 rank: max |diff| / max |map| =', float(np.abs(a - b).max() / np.abs(a).max()))
PY
