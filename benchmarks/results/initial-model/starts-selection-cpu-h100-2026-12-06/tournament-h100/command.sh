#!/bin/bash
# the second device command, on the same warm H100 right after 1-seeds-and-comparisons.sh (its data in /tmp/imd):
# tests/test_gpu.py, the default job (--seed 0) and --starts 3 --select-at 20 on the issue's set, the STAR writer
source benchmarks/gpu_setup.sh; gpu_setup im-select2; T0=$(date +%s)
(timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3 > $R/gpu_tests.txt)
echo "gpu tests $(( $(date +%s) - T0 )) s: $(tail -1 $R/gpu_tests.txt)" | tee -a $R/steps.txt
ls /tmp/imd >/dev/null 2>&1 && for a in "1 0" "3 20"; do
  set -- $a; t=$EPOCHREALTIME
  if [ $1 = 1 ]; then o="--seed 0"; else o="--seed 0 --starts 3 --select-at 20"; fi
  (cd /tmp && timeout 150 python3 -m mpi_em initial-model --i /tmp/imd/particles_unaligned.star --o /tmp/t$1 \
     --overwrite --device gpu $o > $R/t$1.log 2>&1)
  echo "starts $1: exit $? $(python3 -c "print(round($EPOCHREALTIME - $t, 1))") s" | tee -a $R/steps.txt
  cp /tmp/t$1/run.log $R/t$1_run.log
done
timeout 100 python3 benchmarks/star_write.py --n 750000 --workers 1 2 4 8 --repeat 1 --json $R/star_write_750k.json \
  > $R/star_write_750k.txt 2>&1
echo "star $?" >> $R/steps.txt; tar czf $OUT/im-select2.tgz -C /tmp im-select2
