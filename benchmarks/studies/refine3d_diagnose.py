"""Per-iteration diagnostics of a refinement (refine3d) on simulated data (issue 4's monotonicity study).

usage: python benchmarks/studies/refine3d_diagnose.py DATA_DIR RUN_DIR [--hard]

For every iteration: FSC-0.5 resolution of both half maps against the truth, their mean truth-FSC over shells 4 to
0.85 Nyquist (a statistic of the whole curve, less noisy than one crossing; the same shells every iteration), the gold-standard
resolution, the median angular and shift errors of the iteration's poses, the posterior spread ("accuracy"), the
offset prior's sigma and the current size from the model STAR / log; with --hard, also the FSC-0.5 resolution of
a reconstruction of all particles at the iteration's best poses (`mpi-em reconstruct`), which separates pose
quality from the soft (posterior-weighted) M-step.
"""
import glob
import os
import re
import subprocess
import sys
import tempfile

import mrcfile
import numpy as np
import starfile

from mpi_em.evaluate import pose_errors
from mpi_em.fsc import fsc, resolution_at


def main(argv):
    data, run = argv[0], argv[1]
    hard = "--hard" in argv
    truth = mrcfile.read(os.path.join(data, "truth.mrc")).astype(np.float64)
    box = truth.shape[0]
    apix = float(mrcfile.open(os.path.join(data, "truth.mrc")).voxel_size.x)
    logs = {}
    log = os.path.join(os.path.dirname(run.rstrip("/")), "run.log")
    if os.path.exists(log):
        for line in open(log):
            m = re.search(r"iteration (\d+): .*accuracy ([\d.]+)°.*resolution ([\d.]+) Å, next order (\d+)", line)
            if m:
                logs[int(m.group(1))] = (float(m.group(2)), float(m.group(3)), int(m.group(4)))
    print("it | half1 / half2 vs truth (Å) | mean truth-FSC sh4-0.85Nyq | gold (Å) | median err (°) | shift err (Å) | "
          "accuracy (°) | sigma_offset (Å) | size | hard-assignment map (Å)")
    for h1 in sorted(glob.glob(os.path.join(run, "run_it*_half1_class001_unfil.mrc"))):
        it = int(re.search(r"run_it(\d+)_", h1).group(1))
        tag = os.path.abspath(os.path.join(run, f"run_it{it:03d}"))
        maps = [mrcfile.read(h1), mrcfile.read(f"{tag}_half2_class001_unfil.mrc")]
        model = starfile.read(f"{tag}_model.star")
        gen = model["model_general"]
        size = int(gen["rlnCurrentImageSize"].iloc[0])
        curves = [fsc(m, truth) for m in maps]
        res = [resolution_at(c, box, apix, 0.5) for c in curves]
        mean = [float(np.mean(c[4:int(0.85 * box / 2) + 1])) for c in curves]
        ang, sh = pose_errors(f"{tag}_data.star", os.path.join(data, "particles.star"))
        acc, gold, order = logs.get(it, (float("nan"), float(gen["rlnCurrentResolution"].iloc[0]), -1))
        hard_res = ""
        if hard:
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, "-m", "mpi_em", "reconstruct", "--i", f"{tag}_data.star", "--o", tmp],
                               check=True, capture_output=True, cwd=data)  # (older runs: names relative to DATA)
                hard_res = "%.2f" % resolution_at(fsc(mrcfile.read(os.path.join(tmp, "map.mrc")), truth), box, apix,
                                                  0.5)
        print("%d | %.2f / %.2f | %.4f / %.4f | %.2f | %.2f | %.2f | %.2f | %.2f | %d (order %d) | %s"
              % (it, res[0], res[1], mean[0], mean[1], gold, np.median(ang), np.median(sh), acc,
                 float(gen["rlnSigmaOffsetsAngst"].iloc[0]), size, order, hard_res))


if __name__ == "__main__":
    main(sys.argv[1:])
