# Common set-up of the GPU benchmark scripts, sourced from the repo root on the GPU machine (wheels of
# ../shared/tools/device-wheels in .whl/):
#   gpu_setup NAME           -> $OUT (argument 1 of the script, default /tmp/out), $R = /tmp/NAME for the results,
#                               wheels from .whl/ installed in /tmp/site and compiled to bytecode with mpi_em/,
#                               environment for mpirun as root,
#                               device name in $R/device.txt
#   gpu_data DIR N           -> N simulated particles (box $BOX = 128, $APIX = 1.5 Å/px, SNR 0.05, seed 11,
#                               $PER_STACK = 5000 per stack, at most $SIM_TIMEOUT = 150 s) in DIR
#                               and DIR/start.mrc = the truth low-passed to $LOWPASS = 30 Å
#   gpu_tests FILE...        -> the GPU tests (default tests/test_gpu.py), summary in $R/gpu_tests.txt
#   gpu_pack                 -> $R packed into $OUT/NAME.tgz (the device returns few files)
gpu_setup() {
  NAME=$1; R=/tmp/$1; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$R"
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
  # bytecode once, as a user's pip install writes it: the GPU machine's Python writes none, and every job compiled
  # ~265 modules from source (0.65 s of a class2d job's start in a profile of the second job of one call:
  # benchmarks/results/relion-side-by-side/h200-classes-prior-2026-12-05/)
  python3 -m compileall -q -j 0 /tmp/site "$PWD/mpi_em" >/dev/null 2>&1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  { nvidia-smi -L; python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"; } \
    > "$R/device.txt" 2>&1
}

gpu_data() {
  local box=${BOX:-128} apix=${APIX:-1.5}
  timeout "${SIM_TIMEOUT:-150}" python3 -m mpi_em simulate --out "$1" --box "$box" --n "$2" --snr 0.05 \
    --apix "$apix" --per-stack "${PER_STACK:-5000}" --seed 11 --start-lowpass "${LOWPASS:-30}" 2>&1 | tail -1
  sync  # the files on disk before a job is timed (not written back while it reads them)
}

gpu_tests() {
  timeout 300 python3 -m pytest -q -p no:cacheprovider "${@:-tests/test_gpu.py}" 2>&1 | tail -3 | tee "$R/gpu_tests.txt"
}

gpu_pack() {
  tar czf "$OUT/$NAME.tgz" -C /tmp "$NAME"
}
