#!/bin/bash
# the warmup test on the final tree
source benchmarks/gpu_setup.sh; gpu_setup z6; timeout 250 python3 -m pytest -q -p no:cacheprovider tests/test_warmup.py 2>&1 | tail -15 | tee $R/warmup_tests.txt; tar czf $OUT/z6.tgz -C /tmp z6
