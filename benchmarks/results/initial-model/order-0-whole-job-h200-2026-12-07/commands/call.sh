#!/bin/bash
# one device call: the whole order-0 default job on 100k box-128 particles, then K = 1, 3 speed if time is left
set -u
OUT=${1:-/tmp/out}
T0=$SECONDS
PARTS=speed KS="" timeout ${SPEEDCAP:-420} bash benchmarks/initial_model_gpu.sh $OUT > /tmp/speed_driver.log 2>&1
echo "whole done at $((SECONDS-T0)) s"; cat /tmp/initial-model-gpu/summary.txt
. benchmarks/gpu_setup.sh; gpu_setup initial-model-gpu
D2=/tmp/imgpu/d128
for K in 1 3; do
  left=$((${CAP:-560} - (SECONDS-T0)))
  [ $left -gt 40 ] || { echo "no time left for K = $K"; break; }
  timeout $left python3 benchmarks/initial_model.py --work /tmp/imgpu/k$K --data $D2 --K $K --device gpu \
    --json $R/speed_K$K.json -- --iter 20 > $R/speed_K$K.txt 2>&1
  echo "K = $K at $((SECONDS-T0)) s: $(tail -1 $R/speed_K$K.txt)" | tee -a $R/summary.txt
done
nvidia-smi --query-gpu=memory.used --format=csv,noheader > $R/memory_after.txt 2>/dev/null
gpu_pack
echo "all done at $((SECONDS-T0)) s"
