#!/usr/bin/env bash
# Issue 19's large-box measurements on one GPU in one go (benchmarks/results/memory/large-box-fixes-h200-*/):
# the memory-related GPU tests, refine3d box 512 under a 24 GB limit (global search, then the full-size local
# search with CuPy's pool and with the driver's allocator, the default under a limit), the box-1024 known-pose reconstruction with 2 ranks
# sharing the GPU, refine3d box 768. Each step is cut at its share of BUDGET seconds (default 580) and the
# results are packed into OUT/large_box.tgz after every step.
# Usage (repo root, wheels of ../shared/tools/device-wheels in .whl/): bash benchmarks/large_box_gpu.sh [OUT]
# (OUT: the folder for large_box.tgz; default $OUT, else /tmp/out)
T0=$(date +%s); END=$((T0 + ${BUDGET:-580}))
left() { local l=$((END - $(date +%s))); [ "$l" -gt "$1" ] && echo "$1" || echo "$l"; }
OUT=${1:-${OUT:-/tmp/out}}
# shellcheck source=benchmarks/gpu_setup.sh
source benchmarks/gpu_setup.sh; gpu_setup large_box; cp "$R/device.txt" "$R/device_name.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$R/device.txt"
L="python3 benchmarks/large_box_memory.py --device gpu --out /tmp/lb --launcher mpirun --accumulate auto"
step() { echo "== $(( $(date +%s) - T0 )) s: $1" | tee -a "$R/steps.txt"; }
keep() {  # job folder name, prefix of the copies; the job's maps then removed (the device's disk is 64 GiB)
  for f in /tmp/lb/$1.log /tmp/lb/$1/run_timings.json /tmp/lb/$1/run.json; do
    [ -f "$f" ] && cp "$f" "$R/$2_$(basename "$f")"
  done
  rm -rf "/tmp/lb/$1"
  tar czf "$OUT/large_box.tgz" -C /tmp large_box
}
step "box 512 data (in the background)"
python3 -m mpi_em --quiet simulate --out /tmp/lb/data512 --box 512 --n 3000 --snr 0.05 --apix 1.0 --seed 1 \
  --per-stack 500 &
SIM=$!
step "GPU tests"
timeout "$(left 120)" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_precision.py \
  tests/test_likelihood.py -m "not slow" > "$R/gpu_tests.txt" 2>&1; tail -n 1 "$R/gpu_tests.txt"
wait $SIM
step "box 512, global search, 24 GB"
timeout "$(left 90)" $L --jobs 512:3000:3 --extra "--max-memory 22.3G" --json "$R/box512_global.json" | tail -n 1
keep refine512 box512_global
step "box 512, local search at the full size, 24 GB, CuPy's pool"
MPI_EM_GPU_ALLOCATOR=pool timeout "$(left 70)" $L --jobs 512:3000:2 --aligned --extra "--max-memory 22.3G --ini-high 2.0" \
  --json "$R/box512_local_pool.json" | tail -n 1
keep refine512_local box512_local_pool
step "the same with the driver's allocator (the default under --max-memory)"
timeout "$(left 70)" $L --jobs 512:3000:2 --aligned \
  --extra "--max-memory 22.3G --ini-high 2.0" --json "$R/box512_local_async.json" | tail -n 1
keep refine512_local box512_local_async
step "box 1024 reconstruct, 2 ranks on one GPU"
timeout "$(left 200)" $L --job reconstruct --ranks 2 --accumulate single --jobs 1024:300:1 --extra "--pad 1" \
  --json "$R/rec1024_P2.json" | tail -n 1
keep reconstruct1024 rec1024_P2
rm -rf /tmp/lb/data1024 /tmp/lb/data512
step "box 768 refine3d"
timeout "$(left 200)" $L --jobs 768:1000:2 --json "$R/box768.json" | tail -n 1
keep refine768 box768
step done
