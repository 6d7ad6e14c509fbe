#!/bin/bash
# refine3d on simulated data, FSC 0.5 of every iteration's half maps with the truth (issue 4's monotonicity study).
# usage: bash benchmarks/refine3d_iterations.sh OUTDIR BOX N SNR APIX ITER MAXORDER [extra refine3d options...]
# (2 ranks, CPU unless MPI_EM_DEVICE=gpu; data seed 2 unless DATA_SEED is set; the start is the truth low-passed to
# 1/4 Nyquist, as in tests/test_em_jobs.py; START_NOISE=a adds low-passed noise of a x its standard deviation)
set -e
D=$1 box=$2 n=$3 snr=$4 apix=$5 iter=$6 mo=$7; shift 7
export OMP_NUM_THREADS=1 MPI_EM_DEVICE=${MPI_EM_DEVICE:-cpu}
PY=${PYTHON:-python}
rm -rf "$D"; mkdir -p "$D"
ini=$($PY -c "print(8 * $apix)")
$PY -m mpi_em simulate --out "$D/d" --box "$box" --n "$n" --snr "$snr" --apix "$apix" --seed "${DATA_SEED:-2}" \
  --max-shift 2 --start-lowpass "$ini" >/dev/null 2>&1
if [ "${START_NOISE:-0}" != 0 ]; then  # optional: a start that is not the truth's own low-pass
$PY - "$D" "$box" "$apix" <<'PY'
import os, sys, mrcfile, numpy as np
from mpi_em.em.model import lowpass
d, box, apix = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = mrcfile.read(f"{d}/d/start.mrc").astype(np.float64)
a = float(os.environ["START_NOISE"])
e = lowpass(np.random.default_rng(99).standard_normal(s.shape), box, apix, 8 * apix)
with mrcfile.new(f"{d}/d/start.mrc", overwrite=True) as m:
    m.set_data((s + a * s.std() / e.std() * e).astype(np.float32)); m.voxel_size = apix
PY
fi
mpirun -n 2 ${MPIRUN_OPTS:-} $PY -m mpi_em refine3d --i "$D/d/particles_unaligned.star" --ref "$D/d/start.mrc" --ini-high "$ini" \
  --o "$D/ref" --max-order "$mo" --iter "$iter" "$@" > "$D/run.log" 2>&1
$PY - "$D" "$box" "$apix" <<'PY'
import glob, sys, mrcfile, numpy as np
from mpi_em.evaluate import pose_errors
from mpi_em.fsc import fsc, resolution_at
d, box, apix = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
t = mrcfile.read(f"{d}/d/truth.mrc").astype(np.float64)
res = lambda f: round(resolution_at(fsc(mrcfile.read(f), t), box, apix, 0.5), 2)
s = res(f"{d}/d/start.mrc")
h = [[res(f) for f in sorted(glob.glob(f"{d}/ref/run_it*_half{k}_class001_unfil.mrc"))] for k in (1, 2)]
ang, _ = pose_errors(f"{d}/ref/run_data.star", f"{d}/d/particles.star")
g = [round(float(l.split("resolution ")[1].split(" ")[0]), 2) for l in open(f"{d}/run.log") if "E-step" in l and "resolution " in l]
import starfile
fin = int(starfile.read(f"{d}/ref/run_model.star")["model_general"]["rlnCurrentIteration"].iloc[0])
print("start", s, "half1", h[0], "half2", h[1], "gold", g, "median angular error %.2f" % np.median(ang),
      "final: iteration %d, combined map vs truth %.2f" % (fin, res(f"{d}/ref/run_class001.mrc")))
PY
