#!/bin/bash
# GPU check for the foundation: GPU-vs-CPU tests, insertion throughput, end-to-end reconstruct on the GPU.
# Run on the lent GPU machine from the repo root, with the wheels of ../shared/tools/device-wheels in .whl/:
#   bash benchmarks/gpu_issue2.sh "$OUT"
set -u
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_codec.py tests/test_fourier.py tests/test_ctf.py 2>&1 | tee "$OUT/gpu_tests.log"
for acc in complex128 complex64; do
  python3 benchmarks/bench_insert.py --device gpu --box 64 128 256 --acc $acc --json "$OUT/insert_gpu_$acc.json" 2>&1 | tee -a "$OUT/insert_gpu.txt"
done
python3 -m mpi_em simulate --out /tmp/d128 --box 128 --n 20000 --snr 0.05 --apix 1.5 --per-stack 2000 2>&1 | tail -1
for P in 1 2; do
  /usr/bin/time -f "wall %e s, max RSS %M kB" mpirun -n $P --oversubscribe python3 -m mpi_em reconstruct --i /tmp/d128/particles.star --o /tmp/d128/rec$P --device gpu --batch 2048 2>&1 | grep -v "inserted" | tee -a "$OUT/reconstruct_gpu.txt"
  cp /tmp/d128/rec$P/run.json "$OUT/reconstruct_gpu_P$P.json"
done
python3 -m mpi_em fsc /tmp/d128/rec1/map.mrc /tmp/d128/rec2/map.mrc | tee -a "$OUT/reconstruct_gpu.txt"
python3 - <<'PY' | tee -a "$OUT/reconstruct_gpu.txt"
import mrcfile, numpy as np
a = mrcfile.read('/tmp/d128/rec1/map.mrc'); b = mrcfile.read('/tmp/d128/rec2/map.mrc')
print('1-rank vs 2-rank GPU map: max |diff| / max |map| =', float(np.abs(a - b).max() / np.abs(a).max()))
PY
cp /tmp/d128/rec1/fsc.png "$OUT/reconstruct_gpu_fsc.png"
