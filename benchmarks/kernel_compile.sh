#!/usr/bin/env bash
# One-time GPU kernel compilation: the same refine3d job on one GPU with an empty CuPy kernel cache (a fresh
# machine, or a new CuPy/driver), with the cache that job filled (every later job), and with an empty cache filled
# by `mpi-em warmup` beforehand (its own time reported). Prints a table and writes OUT/kernel_compile.json: wall
# time, seconds of the first iteration, seconds per later iteration, kernels compiled by the job itself; the kernels
# the job compiled after the warmup are named in OUT/new_kernels_after_warmup.txt (CuPy's saved CUDA sources: kernel
# name, types, block size), the ones `mpi-em warmup` is still missing.
# Usage (repo root, python3 with CuPy and mpi4py): bash benchmarks/kernel_compile.sh OUT [BOX] [N] [ITER]
set -euo pipefail
out=${1:?usage: kernel_compile.sh OUT [BOX] [N] [ITER]}; box=${2:-128}; n=${3:-10000}; iters=${4:-4}
mkdir -p "$out"; out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
[ -f "$out/data/particles.star" ] || python3 -m mpi_em --quiet simulate --out "$out/data" --box "$box" --n "$n" --snr 0.05 \
  --apix 1.5 --seed 1
rm -f "$out/wall.txt"
cache=$(mktemp -d); cache2=$(mktemp -d)
t0=$(date +%s.%N)
CUPY_CACHE_SAVE_CUDA_SOURCE=1 CUPY_CACHE_DIR=$cache2 python3 -m mpi_em warmup > "$out/warmup.log" 2>&1
find "$cache2" -type f | sort > "$out/.warmup_cache.txt"
t1=$(date +%s.%N)
echo "warmup $(python3 -c "print(round($t1 - $t0, 2))") $(find "$cache2" -type f ! -name '*.cu' | wc -l)" >> "$out/wall.txt"
for case in cold warm warmed; do
  rm -rf "$out/$case"
  c=$cache; [ $case = warmed ] && c=$cache2
  before=$(find "$c" -type f ! -name '*.cu' | wc -l)
  t0=$(date +%s.%N)
  CUPY_CACHE_SAVE_CUDA_SOURCE=1 CUPY_CACHE_DIR=$c mpirun -n 1 python3 -m mpi_em refine3d --i "$out/data/particles.star" --ref "$out/data/truth.mrc" \
    --ini-high 30 --iter "$iters" --o "$out/$case" > "$out/$case.log" 2>&1
  t1=$(date +%s.%N)
  echo "$case $(python3 -c "print(round($t1 - $t0, 2))") $(( $(find "$c" -type f ! -name '*.cu' | wc -l) - before ))" >> "$out/wall.txt"
done
: > "$out/new_kernels_after_warmup.txt"
for f in $(find "$cache2" -type f -name '*.cu' | sort | comm -13 "$out/.warmup_cache.txt" -); do
  { echo "== $(basename "$f")"; grep -E '__global__|^typedef|#define (BLOCK_SIZE|ITEMS_PER_THREAD)' "$f" || true; } \
    >> "$out/new_kernels_after_warmup.txt"
done
rm -f "$out/.warmup_cache.txt"
python3 - "$out" "$box" "$n" <<'PY'
import json, os, sys
out, box, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
wall = {w[0]: (float(w[1]), int(w[2])) for w in (line.split() for line in open(os.path.join(out, "wall.txt")))}
rows = []
for case in ("cold", "warm", "warmed"):
    t = json.load(open(os.path.join(out, case, "run_timings.json")))
    it = [r["seconds_iteration"] for r in t]
    rows.append({"cache": case, "wall_s": wall[case][0], "kernels_compiled": wall[case][1], "first_iteration_s": it[0],
                 "later_iteration_s": sum(it[1:]) / max(1, len(it) - 1), "iterations": len(it)})
res = {"box": box, "n": n, "warmup_s": wall["warmup"][0], "warmup_kernels": wall["warmup"][1], "rows": rows}
json.dump(res, open(os.path.join(out, "kernel_compile.json"), "w"), indent=1)
print(f"refine3d box {box}, {n} particles, 1 GPU rank; mpi-em warmup: {res['warmup_s']:.1f} s, "
      f"{res['warmup_kernels']} kernels")
print(f"{'cache':28} {'wall s':>8} {'1st it s':>9} {'later it s':>11} {'compiled':>9}")
names = {"cold": "empty", "warm": "filled by the same job", "warmed": "filled by mpi-em warmup"}
for r in rows:
    print(f"{names[r['cache']]:28} {r['wall_s']:8.1f} {r['first_iteration_s']:9.1f} {r['later_iteration_s']:11.2f} "
          f"{r['kernels_compiled']:9d}")
PY
