#!/bin/bash
# one device call: initial-model's images kept on the GPU (--cache-images auto) against read for every mini-batch
# (--cache-images off), then the tree before the E-step batch change (.dev/base), on one machine
set -u
OUT=${1:-/tmp/out}
T0=$SECONDS
. benchmarks/gpu_setup.sh; gpu_setup initial-model-cache
W=/tmp/imgpu; D2=$W/d128; mkdir -p $W
say() { echo "$(date +%T) [$((SECONDS-T0)) s] $*" | tee -a $R/summary.txt; }
python3 -m mpi_em warmup > $R/warmup.log 2>&1 &
python3 -m mpi_em simulate --out $D2 --box ${BOX:-128} --n ${NSIM:-100000} --snr 0.05 --apix 1.5 --seed 1 --device ${DEV:-gpu} \
  > $R/sim_128.log 2>&1
wait; sync
say "warmup + simulation + sync done"
BASE=$PWD/.dev/base
job() {  # job NAME TREE(new|old) LIMIT [benchmark options [-- job options]]
  local name=$1 tree=$2 lim=$3; shift 3
  local left=$((${CAP:-560} - (SECONDS-T0)))
  [ $left -gt 40 ] || { say "$name: no time left"; return; }
  [ $lim -lt $left ] || lim=$left
  if [ $tree = old ]; then
    (cd $BASE && timeout $lim python3 benchmarks/initial_model.py --work $W/$name --data $D2 --device ${DEV:-gpu} \
      --json $R/$name.json "$@" > $R/$name.txt 2>&1)
  else
    timeout $lim python3 benchmarks/initial_model.py --work $W/$name --data $D2 --device ${DEV:-gpu} --json $R/$name.json \
      "$@" > $R/$name.txt 2>&1
  fi
  cp $W/$name/run.log $R/${name}_run.log 2>/dev/null
  say "$name ($tree): $(tail -1 $R/$name.txt)"
}
job whole_cache new 150
job whole_nocache new 150 -- --cache-images off
python3 - $W > $R/maps_compared.txt 2>&1 <<'PY'
import sys, numpy as np
from mpi_em.io import read_map
w = sys.argv[1]
a, b = (read_map(f"{w}/{n}/run/run_class001.mrc")[0] for n in ("whole_cache", "whole_nocache"))
print("images kept vs read: max |difference| / max |map| = %.3g" % (np.abs(a - b).max() / np.abs(a).max()))
PY
say "$(cat $R/maps_compared.txt)"
job k1_cache new 90 -- --iter 20
job k3_cache new 90 --K 3 -- --iter 20
left=$((${CAP:-560} - (SECONDS-T0)))
if [ $left -gt 50 ]; then  # where a mini-batch's time goes now: 40 mini-batches under cProfile (e_step and
  # reconstruct end in a synchronisation or a copy to the host, so their cumulative times are the GPU's too)
  timeout $((left - 10)) python3 -m cProfile -o $R/prof.out -m mpi_em initial-model --i $D2/particles_unaligned.star \
    --o $W/prof --iter 40 --no-final-pass --device ${DEV:-gpu} > $R/prof_run.txt 2>&1
  python3 - $R/prof.out > $R/prof.txt 2>&1 <<'PY'
import pstats, sys
s = pstats.Stats(sys.argv[1])
names = {"e_step", "reconstruct", "__init__", "checkpoint", "write_iteration", "expectation_batch", "prepare_batch",
         "insert", "shell_statistics", "divide_in_ball", "release_device_memory", "gather_particles", "save",
         "update_plan_poses", "batches", "iter_batches", "global_grid", "subplan", "write_back", "root_step",
         "reduce_and_reconstruct_3d", "_reconstruct_owned", "to_host", "check_finite_maps", "slices_png"}
rows = [(v[3], v[1], n, f) for (f, l, n), v in s.stats.items() if n in names and v[3] > 0.05]
for cum, calls, n, f in sorted(rows, reverse=True):
    print(f"{cum:8.2f} s {calls:6d} calls  {n:28s} {f[-50:]}")
PY
  say "profile: $(tail -1 $R/prof_run.txt)"
fi
job whole_old old 200
nvidia-smi --query-gpu=memory.used --format=csv,noheader > $R/memory_after.txt 2>/dev/null
gpu_pack
say "all done"
