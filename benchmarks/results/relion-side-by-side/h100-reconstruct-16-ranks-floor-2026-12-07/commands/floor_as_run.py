"""What any Python + CuPy reconstruct must spend on this machine: the interpreter with the imports and the CUDA
context, reading the STAR file, and reading every image once into page-locked memory and onto the GPU (no
insertion). Usage: python3 floor.py STAR [repeats]"""
import json
import subprocess
import sys
import time

star = sys.argv[1]
rep = int(sys.argv[2]) if len(sys.argv) > 2 else 3
out = {}


def wall(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


out["python_empty_s"] = [wall([sys.executable, "-c", "pass"]) for _ in range(rep)]
out["python_imports_cuda_s"] = [wall([sys.executable, "-c",
                                      "import cupy, mpi4py.MPI, mpi_em.jobs.reconstruct; cupy.zeros(1).sum()"])
                                for _ in range(rep)]
out["star_read_in_process_s"] = [wall([sys.executable, "-c",
                                       f"from mpi_em.io import read_particles; read_particles({star!r})"])
                                 for _ in range(rep)]
code = f"""
import time, numpy as np, cupy
from mpi_em.io import read_particles
from mpi_em.distributed import make_plan
from mpi_em.particles import iter_batches
cupy.zeros(1).sum()
star = read_particles({star!r})
plan = make_plan(star, 1)[0]
t = time.perf_counter(); n = 0
for sl, imgs in iter_batches(plan, 256, pinned=True):
    g = cupy.asarray(imgs); n += imgs.nbytes
cupy.cuda.Device().synchronize()
print(time.perf_counter() - t, n)
"""
reads = []
for _ in range(rep):
    r = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    s, nb = r.stdout.split()
    reads.append(float(s))
out["images_read_to_gpu_s"] = reads
out["images_bytes"] = int(nb)
print(json.dumps(out, indent=1))
