#!/bin/bash
# two conformations, box 32: class3d K=2 and K=4, re-seeding 0.2 vs 0, three data seeds
M=${MPI_EM:-mpi-em}; PY=${PYTHON:-python3}
for s in 2 3 4; do
  [ -d d$s ] || { $M simulate --out d$s --box 32 --n 600 --snr 0.5 --apix 4.0 --conformations 2 --seed $s > /dev/null
  $PY - d$s <<'PY'
import sys, mrcfile, numpy as np
from mpi_em.em.model import lowpass
d = sys.argv[1]
t = [mrcfile.read(f"{d}/truth_class{k:03d}.mrc").astype(np.float64) for k in (1, 2)]
with mrcfile.new(f"{d}/start.mrc", overwrite=True) as m:
    m.set_data(lowpass(0.5 * (t[0] + t[1]), 32, 4.0, 16.0).astype(np.float32)); m.voxel_size = 4.0
PY
  }
  for K in 2 4; do for rs in 0.2 0; do
    o=o_s${s}_K${K}_r${rs}
    [ -f $o/run_data.star ] || OMP_NUM_THREADS=1 $M class3d --i d$s/particles_unaligned.star --ref d$s/start.mrc --ini-high 16 --K $K --iter 12 --reseed-below $rs --o $o > $o.log 2>&1
    $PY - d$s $o <<'PY'
import sys, starfile, numpy as np
from mpi_em.evaluate import class_accuracy
t = starfile.read(f"{sys.argv[1]}/particles.star", always_dict=True)["particles"]["rlnClassNumber"].to_numpy()
g = starfile.read(f"{sys.argv[2]}/run_data.star", always_dict=True)["particles"]["rlnClassNumber"].to_numpy()
sizes = np.bincount(g, minlength=5)[1:]
print(sys.argv[2], "accuracy", round(class_accuracy(g, t), 4), "sizes", sizes.tolist())
PY
  done; done
done
