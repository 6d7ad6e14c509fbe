#!/bin/bash
# seeds 8-15 on the 2-core VM (two jobs at a time, one thread each), the data of seeds0-7 (/tmp/ims/data):
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
python benchmarks/initial_model_select.py --work /tmp/sel2 --data /tmp/ims/data --seeds 8 9 10 11 12 13 14 15 \
  --select-at 10 20 40 150 --parallel 2 --device cpu --maps-from /tmp/ims --json /tmp/sel2/select.json
# (stopped once the eight jobs had finished: its comparison of all 16 maps, one pass after the other, would have
# taken ~1 h here) then the eight maps compared among themselves after iterations 20 and 150, side by side:
for j in 20 150; do
  python benchmarks/initial_model_select.py --work /tmp/sel2 --data /tmp/ims/data --select-at $j --device cpu \
    --json /tmp/sel2/select_$j.json > /tmp/sel2/select_$j.txt 2>&1 &
done; wait
# all 32 seeds in one table:
python benchmarks/results/initial-model/starts-selection-cpu-h100-2026-12-06/commands/merge.py \
  benchmarks/results/initial-model/starts-selection-cpu-h100-2026-12-06
