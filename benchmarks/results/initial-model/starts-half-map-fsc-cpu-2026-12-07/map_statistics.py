"""Two map-only yardsticks for the six seeds' maps after their last mini-batch (W/wS/run/run_it150_class001.mrc):
the real-space anisotropy (energy left after the radial average about the centre of mass, inside 0.4 x the box,
over the map's energy there) and the spread of |F| within Fourier shells 3-10 (std / mean); and the maps brought to
one amplitude spectrum (their mean, shell by shell) for a comparison job of maps that differ in phases only.

usage: python map_statistics.py W OUT_DIR   (the normalised maps go to OUT_DIR/sS.mrc)"""
import os
import sys

import numpy as np

from mpi_em.io import read_map, write_map

w, out = sys.argv[1], sys.argv[2]
seeds = (16, 17, 18, 19, 20, 21)
maps, apix = {}, None
for s in seeds:
    v, apix = read_map(os.path.join(w, f"w{s}", "run", "run_it150_class001.mrc"))
    maps[s] = v.astype(np.float64)
n = maps[seeds[0]].shape[0]
k = np.fft.fftfreq(n) * n
kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
kr = np.rint(np.sqrt(kx ** 2 + ky ** 2 + kz ** 2)).astype(int)
F = {s: np.fft.fftn(v) for s, v in maps.items()}
amp = {s: np.bincount(kr.ravel(), np.abs(f).ravel()) / np.maximum(np.bincount(kr.ravel()), 1) for s, f in F.items()}
target = np.mean([amp[s] for s in seeds], axis=0)
os.makedirs(out, exist_ok=True)
for s in seeds:
    v = maps[s]
    z, y, x = np.indices(v.shape) - n // 2
    wpos = np.clip(v, 0, None)
    cz, cy, cx = [(wpos * a).sum() / wpos.sum() for a in (z, y, x)]
    r = np.sqrt((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2)
    ri = np.rint(r).astype(int)
    radial = np.bincount(ri.ravel(), v.ravel()) / np.maximum(np.bincount(ri.ravel()), 1)
    inside = r < 0.4 * n
    aniso = ((v - radial[ri]) ** 2)[inside].sum() / ((v - v[inside].mean()) ** 2)[inside].sum()
    a = np.abs(F[s])
    spread = [a[kr == sh].std() / a[kr == sh].mean() for sh in range(3, 11)]
    print(f"seed {s}: anisotropy {aniso:.3f}, |F| spread in shells 3-10 " + " ".join(f"{x:.2f}" for x in spread))
    scale = np.where(amp[s] > 0, target / np.maximum(amp[s], 1e-30), 0.0)[kr]
    write_map(os.path.join(out, f"s{s}.mrc"), np.real(np.fft.ifftn(F[s] * scale)).astype(np.float32), apix)
