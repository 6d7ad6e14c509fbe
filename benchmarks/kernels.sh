#!/bin/bash
# The GPU kernels against their ceilings, one benchmark per MODE (results in $R, packed into $OUT/NAME.tgz):
#   bash benchmarks/kernels.sh OUT NAME MODE...                 # from the repo root on the device, wheels in .whl/
# MODE:
#   tests      GPU = CPU tests: $TESTS (default tests/test_gpu.py tests/test_fourier.py tests/test_fourier2d.py
#              tests/test_codec.py)
#   insertion  insertion and projection throughput (stencil arrays vs fused kernels) at boxes 64, 128, 256 with the
#              scatter-add ceilings of the same run and the 78-copy symmetry anchor (benchmarks/insertion.py
#              --project --anchor-n 100000); ACC="complex128 complex64": insertion only, once per accumulator type
#   anchor     the symmetry anchor alone (100 000 box-64 projections, 78 copies), per copy and symmetrised sum
#   estep      one E-step at box 128, 8192 particles, order 3 (r = 29 px) and 2 (r = 21 px) at the default offset
#              range (benchmarks/estep.py); OFFSETS="3 5": order 3 at those offset ranges instead
#   codec      the volume codec, GPU packing + host zstd, Np = 128, 256 (benchmarks/codec.py)
#   gemm       SGEMM (FP32, TF32) and CGEMM ceilings, 8192^3 (benchmarks/gemm_ceiling.py)
set -u
OUT=${1:-/tmp/out}; . benchmarks/gpu_setup.sh; gpu_setup ${2:-kernels}; shift $(( $# < 2 ? $# : 2 ))
for mode in "$@"; do
  case $mode in
    tests) gpu_tests ${TESTS:-tests/test_gpu.py tests/test_fourier.py tests/test_fourier2d.py tests/test_codec.py} ;;
    insertion)
      if [ -n "${ACC:-}" ]; then
        for acc in $ACC; do
          timeout 300 python3 benchmarks/insertion.py --device gpu --box 64 128 256 --acc $acc \
            --json $R/insert_gpu_$acc.json 2>&1 | tee -a $R/insert_gpu.txt
        done
      else
        timeout 300 python3 benchmarks/insertion.py --device gpu --box 64 128 256 --project --anchor-n 100000 \
          --json $R/insert_gpu.json 2>&1 | tee $R/insert_gpu.txt
      fi ;;
    anchor)
      timeout 150 python3 benchmarks/insertion.py --device gpu --box 64 --n 2000 --anchor-n 100000 \
        --json $R/anchor.json 2>&1 | tail -4 | tee $R/anchor.txt ;;
    estep)
      if [ -n "${OFFSETS:-}" ]; then
        for off in $OFFSETS; do
          timeout 200 python3 benchmarks/estep.py --device gpu --box 128 --n 8192 --batch 1024 --order 3 --r 29 \
            --offset-range $off --json $R/estep_order3_off$off.json 2>&1 | tee $R/estep_order3_off$off.txt
        done
      else
        for o in 3 2; do
          r=$([ $o = 3 ] && echo 29 || echo 21)
          timeout 200 python3 benchmarks/estep.py --device gpu --box 128 --n 8192 --batch 1024 --order $o --r $r \
            --json $R/estep_order$o.json 2>&1 | tee $R/estep_order$o.txt
        done
      fi ;;
    codec) timeout 100 python3 benchmarks/codec.py --np 128 256 --device gpu --json $R/codec_gpu.json 2>&1 \
             | tee $R/codec_gpu.txt ;;
    gemm) timeout 60 python3 benchmarks/gemm_ceiling.py --json $R/gemm_ceiling.json 2>&1 | tail -6 ;;
    *) echo "unknown mode $mode (tests, insertion, anchor, estep, codec, gemm)"; exit 2 ;;
  esac
done
gpu_pack
