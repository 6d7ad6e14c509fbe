#!/bin/bash
# class3d at box 256 without re-seeding: do the classes merge (as RELION's)? Seeds, the direction prior, and a
# joint selection of the fine pass's poses over all classes (RELION's significance over classes; a patched copy)
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup z7
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/z7.tgz" -C /tmp z7; }
step "set-up done"
( python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/d256b --gpu --box 256 --n 3000 --snr 0.05 --apix 1.5 \
  > "$R/data.log" 2>&1; step "data exit $?" ) & DP=$!
mkdir -p /tmp/alt && cp -r mpi_em /tmp/alt/ && python3 - <<'PY'
p = "/tmp/alt/mpi_em/em/search.py"
s = open(p).read()
old = "    if K == 1:\n        return top_k(marg, n_select)\n"
assert old in s
s = s.replace(old, "    if True:  # joint: the best poses over all classes\n        return top_k(marg, n_select + max(0, min(K, class_select) - 1))\n")
open(p, "w").write(s)
PY
python3 -m compileall -q /tmp/alt >/dev/null 2>&1
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"
wait $DP
D=/tmp/d256b
job() {  # NAME PYTHONPATH-FIRST EXTRA...
  local name=$1 pp=$2; shift 2
  local t=$EPOCHREALTIME
  PYTHONPATH=$pp:/tmp/site mpirun -n 1 --bind-to none python3 -m mpi_em class3d --ref $D/start.mrc --ini-high 30.0 --sym C1 \
    --healpix-order 2 --K 4 --iter 25 --tau2-fudge 4 --i $D/particles_unaligned_abs.star --o /tmp/runs/$name \
    --particle-diameter 307.2 --offset-range 5.0 --offset-step 1.0 --device gpu "$@" > /tmp/runs/$name.out 2>&1
  python3 -c "print(round($EPOCHREALTIME - $t, 2))" > /tmp/runs/$name.wall
  step "$name: $(cat /tmp/runs/$name.wall) s, $(grep -o 'classes [0-9./]*%' /tmp/runs/$name/run.log | tail -1)"
}
mkdir -p /tmp/runs
job prior-seed1 $PWD --reseed-below 0 --seed 1
job noprior-seed1 $PWD --reseed-below 0 --seed 1 --no-direction-prior
job joint-prior /tmp/alt --reseed-below 0 --seed 0
job joint-noprior /tmp/alt --reseed-below 0 --seed 0 --no-direction-prior
job prior-seed2 $PWD --reseed-below 0 --seed 2
job noprior-seed2 $PWD --reseed-below 0 --seed 2 --no-direction-prior
job default-seed0 $PWD --seed 0
EVAL_JSON=$R/eval.json python3 commands/eval_runs.py $D /tmp/runs/prior-seed1 /tmp/runs/noprior-seed1 /tmp/runs/joint-prior \
  /tmp/runs/joint-noprior /tmp/runs/prior-seed2 /tmp/runs/noprior-seed2 /tmp/runs/default-seed0 > $R/eval.txt 2>&1
cat $R/eval.txt
for n in /tmp/runs/*/; do cp $n/run.log $R/$(basename $n).log; done
step end; pack
