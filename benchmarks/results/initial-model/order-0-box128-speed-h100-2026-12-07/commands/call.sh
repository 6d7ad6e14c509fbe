#!/bin/bash
# one device call: order-0 speed (K=1,3 and the whole 100k job), then seeds 0-7 of the set with --fit
set -u
OUT=${1:-/tmp/out}
T0=$SECONDS
PARTS=speed timeout ${SPEEDCAP:-420} bash benchmarks/initial_model_gpu.sh $OUT > /tmp/speed_driver.log 2>&1; [ -f $OUT/initial-model-gpu.tgz ] || tar czf $OUT/initial-model-gpu.tgz -C /tmp initial-model-gpu
echo "speed done at $((SECONDS-T0)) s"; cat /tmp/initial-model-gpu/summary.txt
. benchmarks/gpu_setup.sh; gpu_setup im-fit-seeds
D=/tmp/imgpu/d64
python3 -m mpi_em simulate --out $D --box 64 --n 20000 --snr 0.05 --apix 2.5 --seed 1 --device gpu > $R/sim.log 2>&1
echo "sim64 at $((SECONDS-T0)) s"
left=$((${CAP:-560} - (SECONDS-T0)))
[ $left -gt 150 ] || { echo "no time left for seeds"; gpu_pack; exit 0; }
for s in 0 1 2 3 4 5 6 7; do
  timeout $left python3 benchmarks/initial_model.py --work /tmp/imgpu/f$s --data $D --device gpu --fit \
     --json $R/seed$s.json -- --seed $s > $R/seed$s.txt 2>&1 &
done
wait
for s in 0 1 2 3 4 5 6 7; do echo "seed $s: $(tail -1 $R/seed$s.txt)"; done | tee $R/summary.txt
echo "all done at $((SECONDS-T0)) s"
gpu_pack
