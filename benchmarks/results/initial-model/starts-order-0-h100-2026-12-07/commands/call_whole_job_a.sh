#!/bin/bash
# one device call: reconstruct against relion_reconstruct_mpi on all 16 cores of the same machine (box 128 and
# 256), the floor of any Python + CuPy reconstruct there, and initial-model's whole job (1 and 3 starts)
set -u
OUT=${1:-/tmp/out}
T0=$SECONDS
. benchmarks/gpu_setup.sh; gpu_setup reconstruct-floor
say() { echo "$(date +%T) [$((SECONDS-T0)) s] $*" | tee -a $R/summary.txt; }
(bash .relion-gpu/build.sh reconstruct_mpi > $R/build.log 2>&1; echo "build rc $?" >> $R/build.log) &
BUILD=$!
python3 -m mpi_em warmup > $R/warmup.log 2>&1 &
WARM=$!
sbs() {
  python3 benchmarks/relion_side_by_side.py --relion-bin /tmp/relion-gpu/bin --relion-mpirun "$(command -v mpirun)" \
    --mpi-em-cmd "mpirun -n {ranks} --bind-to none python3 -m mpi_em" --gpu --ranks 1 --relion-reconstruct-ranks 16 \
    --threads 1 --snr 0.05 --apix 1.5 --jobs reconstruct "$@"
}
sbs --box 256 --n 20000 --data /tmp/d256 --data-only > $R/data256.log 2>&1
say "data 256: $(tail -1 $R/data256.log)"
sbs --box 128 --n 10000 --data /tmp/d128r --data-only > $R/data128.log 2>&1
say "data 128: $(tail -1 $R/data128.log)"
python3 -m mpi_em simulate --out /tmp/d128 --box 128 --n 100000 --snr 0.05 --apix 1.5 --seed 1 --device gpu \
  > $R/sim_128.log 2>&1
sync
say "initial-model data: $(tail -1 $R/sim_128.log)"
wait $WARM
say "warmup: $(tail -1 $R/warmup.log)"
wait $BUILD
say "build: $(tail -2 $R/build.log | tr '\n' ' ')"
export LD_LIBRARY_PATH=/tmp:${LD_LIBRARY_PATH:-}
cat /tmp/d256/stacks/* > /dev/null; cat /tmp/d128r/stacks/* > /dev/null
for b in 256 128; do
  D=/tmp/d256; N=20000; [ $b = 128 ] && { D=/tmp/d128r; N=10000; }
  sbs --box $b --n $N --data $D --out /tmp/sbs$b --summary $R/box$b --timeout 200 \
    > $R/sbs$b.log 2>&1
  say "box $b: $(grep -a 'wall ours' $R/sbs$b.log)"
  for i in 1 2 3; do  # ours again, without mpirun, as a user's one-GPU run
    s=$SECONDS; python3 -m mpi_em reconstruct --i $D/particles_abs.star --o /tmp/rec$b-$i --device gpu \
      > $R/ours$b-$i.log 2>&1; say "ours box $b, no mpirun, run $i: $((SECONDS-s)) s; $(tail -1 $R/ours$b-$i.log)"
    cp /tmp/rec$b-$i/run.json $R/ours$b-$i.json 2>/dev/null
  done
  timeout 120 python3 .dev/floor.py $D/particles_abs.star 3 > $R/floor$b.json 2> $R/floor$b.err
  say "floor box $b: $(tr -d '\n ' < $R/floor$b.json)"
done
W=/tmp/imgpu; mkdir -p $W
for st in 1 3; do
  left=$((570 - (SECONDS-T0))); [ $left -gt 40 ] || { say "starts $st: no time left"; continue; }
  timeout $left python3 benchmarks/initial_model.py --work $W/s$st --data /tmp/d128 --device gpu --json $R/im_starts$st.json \
    -- --starts $st > $R/im_starts$st.txt 2>&1
  cp $W/s$st/run.log $R/im_starts${st}_run.log 2>/dev/null
  say "initial-model --starts $st: $(tail -1 $R/im_starts$st.txt)"
done
gpu_pack
say "all done"
