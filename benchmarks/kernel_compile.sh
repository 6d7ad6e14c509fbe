#!/usr/bin/env bash
# One-time GPU kernel compilation: the same refine3d job twice on one GPU, first with an empty CuPy kernel cache
# (a fresh machine, or a new CuPy/driver), then with the cache the first run filled (every later job). Prints a
# table and writes OUT/kernel_compile.json: wall time, seconds of the first iteration, seconds per later iteration.
# Usage (repo root, python3 with CuPy and mpi4py): bash benchmarks/kernel_compile.sh OUT [BOX] [N] [ITER]
set -euo pipefail
out=${1:?usage: kernel_compile.sh OUT [BOX] [N] [ITER]}; box=${2:-128}; n=${3:-10000}; iters=${4:-4}
mkdir -p "$out"; out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
[ -f "$out/data/particles.star" ] || python3 -m mpi_em --quiet simulate --out "$out/data" --box "$box" --n "$n" --snr 0.05 \
  --apix 1.5 --seed 1
cache=$(mktemp -d)
for run in cold warm; do
  rm -rf "$out/$run"
  t0=$(date +%s.%N)
  CUPY_CACHE_DIR=$cache mpirun -n 1 python3 -m mpi_em refine3d --i "$out/data/particles.star" --ref "$out/data/truth.mrc" \
    --ini-high 30 --iter "$iters" --o "$out/$run" > "$out/$run.log" 2>&1
  t1=$(date +%s.%N)
  echo "$run $(python3 -c "print(round($t1 - $t0, 2))")" >> "$out/wall.txt"
done
python3 - "$out" "$box" "$n" "$cache" <<'PY'
import json, os, sys
out, box, n, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
wall = dict(line.split() for line in open(os.path.join(out, "wall.txt")))
rows = []
for run in ("cold", "warm"):
    t = json.load(open(os.path.join(out, run, "run_timings.json")))
    it = [r["seconds_iteration"] for r in t]
    rows.append({"run": run, "wall_s": float(wall[run]), "first_iteration_s": it[0],
                 "later_iteration_s": sum(it[1:]) / max(1, len(it) - 1), "iterations": len(it)})
files = sum(len(f) for _, _, f in os.walk(cache))
res = {"box": box, "n": n, "kernel_cache_files": files, "rows": rows}
json.dump(res, open(os.path.join(out, "kernel_compile.json"), "w"), indent=1)
print(f"refine3d box {box}, {n} particles, 1 GPU rank; kernels cached: {files} files")
print(f"{'cache':6} {'wall s':>8} {'1st it s':>9} {'later it s':>11}")
for r in rows:
    print(f"{r['run']:6} {r['wall_s']:8.1f} {r['first_iteration_s']:9.1f} {r['later_iteration_s']:11.2f}")
PY
