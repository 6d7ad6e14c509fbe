"""The floor of any Python + CuPy reconstruction on this machine: what a program written like `mpi-em reconstruct`
must spend before it inserts anything. Three parts, each timed in fresh processes (as a job pays them):

1. the interpreter with NumPy, CuPy, mpi4py and mpi_em's reconstruct module imported and a CUDA context made;
2. reading the particle STAR file (`mpi_em.io.read_particles`: starfile / pandas) in a fresh interpreter;
3. every image read once from its stack into page-locked memory and copied to the GPU (mpi_em's batch reader,
   its read-ahead threads; no insertion), timed inside the process.

Parts 1 and 3 together bound from below the wall time of a one-GPU reconstruct of these particles (part 2 is
needed too, but its process repeats the interpreter's start, so it is not added); against another program's
time it bounds the ratio any such program can reach (benchmarks/results/relion-side-by-side/). Needs CuPy and a GPU.

usage: python benchmarks/reconstruct_floor.py STAR [--repeats 3] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

READ = """
import time, cupy
from mpi_em.io import read_particles
from mpi_em.distributed import make_plan
from mpi_em.particles import iter_batches
cupy.zeros(1).sum()
plan = make_plan(read_particles({star!r}), 1)[0]
t = time.perf_counter(); n = 0
for sl, imgs in iter_batches(plan, 256, pinned=True):
    g = cupy.asarray(imgs); n += imgs.nbytes
cupy.cuda.Device().synchronize()
print(time.perf_counter() - t, n)
"""


def wall(cmd) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("star", help="particles STAR file (image paths readable from here)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per part (default 3)")
    p.add_argument("--json", default=None, help="write the figures here too")
    a = p.parse_args(argv)
    py = sys.executable
    out = {"star": a.star, "date": time.strftime("%Y-%m-%d")}
    out["python_empty_s"] = [wall([py, "-c", "pass"]) for _ in range(a.repeats)]
    out["python_imports_cuda_s"] = [wall([py, "-c", "import cupy, mpi4py.MPI, mpi_em.jobs.reconstruct; "
                                          "cupy.zeros(1).sum()"]) for _ in range(a.repeats)]
    out["star_read_in_process_s"] = [wall([py, "-c", f"from mpi_em.io import read_particles; "
                                           f"read_particles({a.star!r})"]) for _ in range(a.repeats)]
    reads = []
    for _ in range(a.repeats):
        r = subprocess.run([py, "-c", READ.format(star=a.star)], check=True, capture_output=True, text=True)
        s, nbytes = r.stdout.split()
        reads.append(float(s))
    out["images_read_to_gpu_s"], out["images_bytes"] = reads, int(nbytes)
    best = {k: min(v) for k, v in out.items() if k.endswith("_s")}
    # a strict lower bound: the start and the images alone (the STAR file must be read too, but its process repeats
    # the interpreter's start and NumPy's import, so it is not added)
    out["floor_s"] = best["python_imports_cuda_s"] + best["images_read_to_gpu_s"]
    print("| part | seconds (fastest of %d) |" % a.repeats)
    print("|---|---|")
    for k in ("python_empty_s", "python_imports_cuda_s", "star_read_in_process_s", "images_read_to_gpu_s"):
        print(f"| {k[:-2].replace('_', ' ')} | {best[k]:.2f} |")
    print(f"| floor (a lower bound): imports and CUDA + images to the GPU | {out['floor_s']:.2f} |")
    print(f"images: {out['images_bytes'] / 1e9:.2f} GB, {out['images_bytes'] / 1e9 / best['images_read_to_gpu_s']:.1f} "
          f"GB/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
