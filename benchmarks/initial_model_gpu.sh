#!/bin/bash
# Issue 21's measurements of `mpi-em initial-model` on one GPU, in parts (PARTS, default all three):
#   seeds   the default schedule over SEEDS (default "0 1 2 3") on the issue's set: $N (20 000) particles of the
#           compact default phantom, box $BOX (64), 2.5 Å/px, SNR 0.05 (`mpi-em simulate --seed 1`): FSC 0.5 of
#           each map against the truth (benchmarks/initial_model.py, either hand), one JSON per seed
#   refine  refine3d from the best seed's map against refine3d from the truth low-passed to 30 Å on the same
#           particles: gold-standard resolution (the issue: within 3%) and map vs truth (either hand)
#   speed   seconds per 1 000 mini-batch particles at box $BOX2 (128), K in $KS (default "1 3"; `--iter 20`), and
#           the whole default job on $N2 (100 000) box-$BOX2 particles (1.5 Å/px, SNR 0.05)
#   starts  `--starts $NST` (3) on the box-$BOX2 set, then on the issue's set (each of SEEDS as --seed): seconds and
#           map vs truth (not in the default PARTS)
# EXTRA: more initial-model options for every job; DEVICE (gpu); a CPU check of the script:
#   DEVICE=cpu BOX=32 N=400 BOX2=32 N2=400 SEEDS=0 EXTRA="--iter 4 --batch-size 50" bash benchmarks/initial_model_gpu.sh OUT
# Usage (repo root on the GPU machine, wheels of ../shared/tools/device-wheels in .whl/):
#   bash benchmarks/initial_model_gpu.sh OUT        -> OUT/initial-model-gpu.tgz (rows, logs, summary.txt)
set -u
OUT=${1:-/tmp/out}; . benchmarks/gpu_setup.sh; gpu_setup initial-model-gpu
DEV=${DEVICE:-gpu}; B=${BOX:-64}; NN=${N:-20000}; B2=${BOX2:-128}; NN2=${N2:-100000}
W=/tmp/imgpu; mkdir -p $W
say() { echo "== $(date +%T) $*" | tee -a $R/summary.txt; }
python3 -m mpi_em warmup > $R/warmup.log 2>&1
D=$W/d$B
[ -f $D/start.mrc ] || python3 -m mpi_em simulate --out $D --box $B --n $NN --snr 0.05 --apix 2.5 --seed 1 \
  --start-lowpass 30 --device $DEV > $R/sim_$B.log 2>&1
sync  # the simulation's files on disk before a job is timed (not written back while it reads them)
for part in ${PARTS:-seeds refine speed}; do
  case $part in
  seeds)
    for s in ${SEEDS:-0 1 2 3}; do
      # shellcheck disable=SC2086
      python3 benchmarks/initial_model.py --work $W/s$s --data $D --device $DEV --json $R/seed$s.json -- --seed $s \
        ${EXTRA:-} > $R/seed$s.txt 2>&1
      cp $W/s$s/run.log $R/seed${s}_run.log 2>/dev/null
      say "seed $s: $(tail -1 $R/seed$s.txt)"
    done ;;
  refine)
    best=$(python3 - "$R" <<'PY'
import glob, json, os, sys
rows = [(json.load(open(f))["fsc05_A"][0], f) for f in glob.glob(os.path.join(sys.argv[1], "seed*.json"))]
print(os.path.basename(min(rows)[1])[4:-5] if rows else "")
PY
)
    [ -n "$best" ] || { say "refine: no seed row"; continue; }
    for start in im truth; do
      ref=$W/s$best/run/run_class001.mrc; [ $start = truth ] && ref=$D/start.mrc
      python3 -m mpi_em refine3d --i $D/particles_unaligned.star --ref $ref --ini-high 30 --o $W/r_$start --overwrite \
        --device $DEV > $R/refine_$start.log 2>&1
      say "refine3d from $start: exit $?"
    done
    python3 - "$D" "$W" "$best" <<'PY' | tee -a $R/summary.txt
import json, sys
import starfile
from mpi_em.align import align_to_truth, resolution_to_truth
from mpi_em.io import read_map
d, w, best = sys.argv[1:]
truth, apix = read_map(f"{d}/truth.mrc")
true = starfile.read(f"{d}/particles.star")["particles"]
ang = lambda df: [df[c].values for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
rows = {}
for start in ("im", "truth"):
    run = f"{w}/r_{start}"
    # gold-standard: the job's own figure for its final outputs (FSC 0.143 of the half maps)
    gs = float(starfile.read(f"{run}/run_model.star")["model_general"]["rlnCurrentResolution"].iloc[0])
    vol, _ = read_map(f"{run}/run_class001.mrc")
    est = starfile.read(f"{run}/run_data.star")["particles"]
    al, how, _ = align_to_truth(vol, truth, ang(est), ang(true))
    rows[start] = {"gold_standard_A": gs, "map_vs_truth_A": resolution_to_truth(al, truth, apix), "hand": how}
rows["initial_model_seed"] = int(best)
rows["gold_standard_ratio"] = rows["im"]["gold_standard_A"] / rows["truth"]["gold_standard_A"]
print("refine3d from the initial model (seed %s) / from the truth at 30 A: gold-standard %.2f / %.2f A (ratio %.3f), "
      "map vs truth %.2f (%s) / %.2f A" % (best, rows["im"]["gold_standard_A"], rows["truth"]["gold_standard_A"],
      rows["gold_standard_ratio"], rows["im"]["map_vs_truth_A"], rows["im"]["hand"], rows["truth"]["map_vs_truth_A"]))
json.dump(rows, open(w + "/refine.json", "w"), indent=1)
PY
    cp $W/refine.json $R/ 2>/dev/null ;;
  speed)
    D2=$W/d$B2
    [ -f $D2/particles.star ] || python3 -m mpi_em simulate --out $D2 --box $B2 --n $NN2 --snr 0.05 --apix 1.5 \
      --seed 1 --device $DEV > $R/sim_$B2.log 2>&1
    sync  # the simulation's files on disk before a job is timed (not written back while it reads them)
    for K in ${KS-1 3}; do
      # shellcheck disable=SC2086
      python3 benchmarks/initial_model.py --work $W/k$K --data $D2 --K $K --device $DEV --json $R/speed_K$K.json \
        -- --iter 20 --starts 1 ${EXTRA:-} > $R/speed_K$K.txt 2>&1
      say "box $B2, K = $K, 20 iterations: $(tail -1 $R/speed_K$K.txt)"
    done
    # shellcheck disable=SC2086
    python3 benchmarks/initial_model.py --work $W/whole --data $D2 --device $DEV --json $R/whole.json -- ${EXTRA:-} \
      > $R/whole.txt 2>&1
    cp $W/whole/run.log $R/whole_run.log 2>/dev/null
    say "box $B2, $NN2 particles, defaults: $(tail -1 $R/whole.txt)" ;;
  starts)
    # --starts $NST (default 3) on the box-$B2 set, then on the issue's set (each of SEEDS as --seed): time and map
    D2=$W/d$B2
    [ -f $D2/particles.star ] || python3 -m mpi_em simulate --out $D2 --box $B2 --n $NN2 --snr 0.05 --apix 1.5 \
      --seed 1 --device $DEV > $R/sim_$B2.log 2>&1
    sync  # the simulation's files on disk before a job is timed (not written back while it reads them)
    # shellcheck disable=SC2086
    python3 benchmarks/initial_model.py --work $W/whole_st --data $D2 --device $DEV --json $R/whole_starts.json -- \
      --starts ${NST:-3} ${EXTRA:-} > $R/whole_starts.txt 2>&1
    cp $W/whole_st/run.log $R/whole_starts_run.log 2>/dev/null
    say "box $B2, $NN2 particles, --starts ${NST:-3}: $(tail -1 $R/whole_starts.txt)"
    for s in ${SEEDS:-0}; do
      # shellcheck disable=SC2086
      python3 benchmarks/initial_model.py --work $W/st$s --data $D --device $DEV --json $R/starts_seed$s.json -- \
        --seed $s --starts ${NST:-3} ${EXTRA:-} > $R/starts_seed$s.txt 2>&1
      cp $W/st$s/run.log $R/starts_seed${s}_run.log 2>/dev/null
      say "--starts ${NST:-3} --seed $s: $(tail -1 $R/starts_seed$s.txt)"
    done ;;
  esac
done
nvidia-smi --query-gpu=memory.used --format=csv,noheader > $R/memory_after.txt 2>/dev/null
gpu_pack
