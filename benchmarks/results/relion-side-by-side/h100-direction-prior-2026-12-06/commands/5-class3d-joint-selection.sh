#!/bin/bash
# box-256 class3d (defaults) with the fine pass's candidates picked jointly over the classes (a patched copy, run
# from its own folder so that its package is the one imported), seeds 0 and 1; no warmup (class shares and maps
# only, not times)
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup z10
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/z10.tgz" -C /tmp z10; }
( python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d256b --gpu --box 256 --n 3000 --snr 0.05 --apix 1.5 \
  > "$R/data.log" 2>&1; step "data exit $?" ) & DP=$!
mkdir -p /tmp/alt && cp -r mpi_em benchmarks /tmp/alt/ && python3 - <<'PY'
p = "/tmp/alt/mpi_em/em/search.py"
s = open(p).read()
old = "    if K == 1:\n        return top_k(marg, n_select)\n"
assert old in s
s = s.replace(old, "    if True:  # joint: the best poses over all classes\n        return top_k(marg, n_select + max(0, min(K, class_select) - 1))\n")
open(p, "w").write(s)
PY
wait $DP
D=/tmp/d256b
mkdir -p /tmp/runs
job() {  # NAME EXTRA...
  local name=$1; shift
  local t=$EPOCHREALTIME
  (cd /tmp/alt && PYTHONPATH=/tmp/alt:/tmp/site mpirun -n 1 --bind-to none python3 -c "import mpi_em, sys; print(mpi_em.__file__, file=sys.stderr)" 2> /tmp/runs/$name.which
   PYTHONPATH=/tmp/alt:/tmp/site mpirun -n 1 --bind-to none python3 -m mpi_em class3d --ref $D/start.mrc --ini-high 30.0 --sym C1 \
    --healpix-order 2 --K 4 --iter 25 --tau2-fudge 4 --i $D/particles_unaligned_abs.star --o /tmp/runs/$name \
    --particle-diameter 307.2 --offset-range 5.0 --offset-step 1.0 --device gpu "$@" > /tmp/runs/$name.out 2>&1)
  python3 -c "print(round($EPOCHREALTIME - $t, 2))" > /tmp/runs/$name.wall
  step "$name ($(cat /tmp/runs/$name.which)): $(cat /tmp/runs/$name.wall) s, $(grep -o 'classes [0-9./]*%' /tmp/runs/$name/run.log | tail -1)"
}
job joint-seed0 --seed 0
job joint-seed1 --seed 1
EVAL_JSON=$R/eval.json python3 commands/eval_runs.py $D /tmp/runs/joint-seed0 /tmp/runs/joint-seed1 > $R/eval.txt 2>&1
cat $R/eval.txt
for n in /tmp/runs/*/; do cp $n/run.log $R/$(basename $n).log; done
step end; pack
