# Sourced by the session-3 GPU run scripts (benchmarks/gpu_session3_*.sh), from the repo root on the device:
#   gpu_setup RUN_NAME          -> $OUT (argument 1 of the script, default /tmp/out), $R = /tmp/RUN_NAME, wheels
#                                  from .whl/ installed, environment for mpirun as root, device name in $R
#   gpu_data DIR N              -> N simulated box-128 particles (SNR 0.05, 1.5 Å/px, seed 11) in DIR and
#                                  DIR/start.mrc = the truth low-passed to 30 Å (the data of runs D, F, I-M)
gpu_setup() {
  R=/tmp/$1; mkdir -p "$OUT" "$R"
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  nvidia-smi -L > "$R/device.txt"
}

gpu_data() {
  timeout 150 python3 -m mpi_em simulate --out "$1" --box 128 --n "$2" --snr 0.05 --apix 1.5 --per-stack 5000 \
    --seed 11 2>&1 | tail -1
  python3 - "$1" <<'PY'
import sys, mrcfile, numpy as np
from mpi_em.em.model import lowpass
d = sys.argv[1]
v = mrcfile.read(f'{d}/truth.mrc').astype(np.float64)
with mrcfile.new(f'{d}/start.mrc', overwrite=True) as m:
    m.set_data(lowpass(v, 128, 1.5, 30.0).astype(np.float32)); m.voxel_size = 1.5
PY
}
