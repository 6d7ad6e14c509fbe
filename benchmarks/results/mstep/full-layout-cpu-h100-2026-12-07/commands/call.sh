#!/bin/bash
# one device call: the 3D M-step on initial-model's full layout (data inside the reach), the tree before
# (b32fd0c, .dev/base) and this one, on one GPU
set -u
OUT=${1:-/tmp/out}
. benchmarks/gpu_setup.sh; gpu_setup mstep-full-layout
for t in new old; do
  S=benchmarks/mstep.py; [ $t = old ] && S=.dev/base/benchmarks/mstep.py
  timeout 100 python3 $S --box 128 256 --r 13 26 --K 1 --layout full --device gpu --repeats 5 --json $R/$t.json \
    > $R/$t.txt 2>&1
  echo "$t:"; tail -2 $R/$t.txt
done
gpu_pack
