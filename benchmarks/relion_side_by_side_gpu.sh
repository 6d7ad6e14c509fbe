#!/usr/bin/env bash
# mpi_em and RELION's GPU programs side by side on one GPU (benchmarks/relion_side_by_side.py with the GPU settings
# of benchmarks/results/relion-side-by-side/), on a machine whose python3 has CuPy and mpi4py (Open MPI).
# RELION's GPU programs are taken from $RELION_BIN (default /tmp/relion-gpu/bin); this script builds nothing.
# mpi_em: 1 rank on the GPU. RELION: relion_refine_mpi with 3 ranks (a leader and 2 GPU workers x 4 threads),
# relion_reconstruct_mpi on 8 CPU ranks (RELION's reconstruction has no GPU code); the class2d-vdam row runs the serial
# relion_refine (RELION's VDAM refuses MPI: build its `refine` target too).
# Usage (repo root): bash benchmarks/relion_side_by_side_gpu.sh OUTDIR [N] [BOX]   (JOBS, ITER, TIMEOUT, DATA, SUMMARY,
# REFINE_EXTRA, CLASS_EXTRA, PROGRAMS: env; DATA: a data folder shared between runs, made beforehand with --data-only
# if wanted; SUMMARY: a folder for the record without maps, --summary; REFINE_EXTRA: more mpi-em refine3d options,
# --refine-extra; CLASS_EXTRA: more mpi-em class3d / class2d options, --class-extra; PROGRAMS: "mpi_em" or "relion"
# to run one side, the other side's rows kept from the record already in OUTDIR, --programs)
set -uo pipefail
out=${1:?usage: relion_side_by_side_gpu.sh OUTDIR [N] [BOX]}; n=${2:-10000}; box=${3:-128}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=/tmp:${LD_LIBRARY_PATH:-}   # RELION's build links a libtiff stub from /tmp
# exec: a stop signal (a batch system's limit, `timeout`) reaches the benchmark, which ends the running program's
# process group and writes what it has
# shellcheck disable=SC2086
exec python3 benchmarks/relion_side_by_side.py --relion-bin "${RELION_BIN:-/tmp/relion-gpu/bin}" \
  --relion-mpirun "$(command -v mpirun)" --mpi-em-cmd "mpirun -n {ranks} --bind-to none python3 -m mpi_em" \
  --gpu --ranks 1 --relion-ranks 3 --relion-reconstruct-ranks 8 --threads 4 --box "$box" --n "$n" --snr 0.05 \
  --apix 1.5 --iter "${ITER:-5}" --k3d 4 --k2d 50 --timeout "${TIMEOUT:-300}" \
  --jobs ${JOBS:-reconstruct refine3d class3d class2d} --out "$out" ${DATA:+--data "$DATA"} \
  ${SUMMARY:+--summary "$SUMMARY"} ${REFINE_EXTRA:+--refine-extra="$REFINE_EXTRA"} \
  ${CLASS_EXTRA:+--class-extra="$CLASS_EXTRA"} ${PROGRAMS:+--programs $PROGRAMS}
