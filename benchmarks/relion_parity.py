"""Known-pose reconstruction against RELION's, part by part, on particles projected by RELION itself.

For each data set (box, noise) this makes particles with `relion_project --ctf` (two optics groups, astigmatism,
phase shifts, B-factors, origins; optional white noise at a given SNR), reconstructs them with
`relion_reconstruct --ctf` and with our accumulators followed by each variant of the final step, and prints the
FSC against the truth (shells 1 to Nyquist, and the mean over shells 1 to 0.8 Nyquist) of every map.

The variants switch RELION's parts on one at a time over our baseline:
  rmax     insert up to |k| = N/2 and keep the padded ball |q| < pad N/2 (ours: N/2 - 1 and r <= N/2 - 1/2)
  x0       insert the kx = 0 column of an image once (ky >= 0), as RELION (ours: both halves, then merged)
  pm       Pipe & Menon's iterative density weights (10 iterations, Kaiser-Bessel blob r 3.8, alpha 15, order 0)
           instead of F / max(W, 1e-3 mean W)
  mask     RELION's softMaskOutsideMap: outside radius N/2 (cosine edge 3 px) the map is its background mean,
           before the gridding correction (RELION's order) or after it
  radial   radial sinc^2 gridding correction (RELION's) instead of the separable one

    python benchmarks/relion_parity.py --box 48 --snr 0            # noise-free
    python benchmarks/relion_parity.py --box 48 --snr 0.1 --n 2000
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd
import starfile

from mpi_em.distributed import make_plan
from mpi_em.fourier import SliceGeometry, enforce_hermitian_x0, freq_grid_2d, radius_3d, reconstruct
from mpi_em.fsc import fsc
from mpi_em.io import read_particles
from mpi_em.io.mrc import read_map
from mpi_em.jobs.reconstruct import _image_batch
from mpi_em.particles import iter_batches
from mpi_em.reconstruction import Accumulators, insert

APIX = 3.0


def run(cmd, cwd):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode:
        sys.exit(f"{cmd[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def make_data(d, box, n, snr, seed):
    """RELION-projected particles of our phantom; returns (star path, truth). Reuses a finished ``d``."""
    out = os.path.join(d, "noisy.star" if snr > 0 else "clean.star")
    if os.path.exists(out):
        return out, read_map(os.path.join(d, "truth.mrc"))[0].astype(np.float64)
    run([sys.executable, "-m", "mpi_em", "simulate", "--out", d, "--box", box, "--n", n, "--snr", 1e6,
         "--apix", APIX, "--max-shift", 4, "--seed", seed], cwd=d)
    tables = starfile.read(os.path.join(d, "particles.star"), always_dict=True)
    optics, parts = tables["optics"], tables["particles"]
    second = optics.copy()
    second["rlnOpticsGroup"], second["rlnOpticsGroupName"] = 2, "opticsGroup2"
    second["rlnVoltage"], second["rlnSphericalAberration"], second["rlnAmplitudeContrast"] = 200.0, 1.4, 0.07
    optics = pd.concat([optics, second], ignore_index=True)
    rng = np.random.default_rng(seed + 8)
    parts["rlnOpticsGroup"] = np.where(np.arange(len(parts)) % 2 == 0, 1, 2)
    parts["rlnPhaseShift"] = rng.uniform(0, 90, len(parts))
    parts["rlnCtfBfactor"] = rng.uniform(0, 60, len(parts))
    parts["rlnDefocusV"] = parts["rlnDefocusU"] - rng.uniform(0, 1500, len(parts))
    starfile.write({"optics": optics, "particles": parts}, os.path.join(d, "poses.star"), overwrite=True)
    proj = [shutil.which("relion_project"), "--i", "truth.mrc", "--ang", "poses.star", "--ctf", "--angpix", APIX]
    run(proj + ["--o", "clean"], cwd=d)
    out = "clean"
    if snr > 0:
        clean = read_map(os.path.join(d, "clean.mrcs"))[0].astype(np.float64)
        sigma = float(np.sqrt(clean.var(axis=(1, 2)).mean() / snr))
        run(proj + ["--o", "noisy", "--add_noise", "--white_noise", sigma], cwd=d)
        out = "noisy"
    truth = read_map(os.path.join(d, "truth.mrc"))[0].astype(np.float64)
    return os.path.join(d, out + ".star"), truth


class Geometry(SliceGeometry):
    """SliceGeometry with r_max up to N/2 and a padded grid of ``extra`` more voxels (no stencil wrap-around);
    ``x0_once``: drop the kx = 0, ky < 0 points (RELION inserts the kx = 0 column once)."""

    def __init__(self, box, r_max, pad=2, extra=4, x0_once=False):
        super().__init__(box, r_max=box // 2 - 1, pad=pad)
        r = np.sqrt(freq_grid_2d(box)[0] ** 2 + freq_grid_2d(box)[1] ** 2)
        ky, kx = np.broadcast_arrays(*freq_grid_2d(box))
        keep = r <= r_max
        if x0_once:
            keep &= ~((kx == 0) & (ky < 0))
        flat = np.flatnonzero(keep.ravel())
        self.index = flat
        self.kxy = np.stack([kx.ravel()[flat], ky.ravel()[flat]], axis=1)
        self.m = flat.size
        self.r_max = float(r_max)
        self.npad = pad * box + extra
        self.vol_shape = (self.npad, self.npad, self.npad // 2 + 1)


def accumulate(star_path, box, r_max, x0_once, pad=2):
    star = read_particles(star_path)
    plan = make_plan(star, 1)[0]
    geom = Geometry(box, r_max, pad, x0_once=x0_once)
    acc = Accumulators(geom, n_vol=1)
    for sl, imgs in iter_batches(plan, 256):
        half, A, data, weights = _image_batch(plan, sl, imgs, geom, box, APIX, True)
        insert(acc, 0, A, data, weights)
    # back to the standard (pad*box)^3 grid: frequencies -npad/2 .. npad/2 - 1 (kx 0 .. npad/2)
    npad, big = pad * box, geom.npad
    f = np.fft.fftfreq(npad, 1.0 / npad).astype(int)
    src = f % big
    F = acc.F[0][np.ix_(src, src, np.arange(npad // 2 + 1))]
    W = acc.W[0][np.ix_(src, src, np.arange(npad // 2 + 1))]
    return F, W


def ft_blob(w, a=3.8, alpha=15.0):
    """Fourier transform of RELION's order-0 Kaiser-Bessel blob (radius a, alpha), normalised to 1 at w = 0;
    0 from w = 0.5 on (RELION's table)."""
    def f(w):
        s2 = alpha ** 2 - (2 * np.pi * a * w) ** 2
        s = np.sqrt(np.abs(s2))
        # I_{3/2}(s) / s^{3/2} and J_{3/2}(s) / s^{3/2}, up to a common factor sqrt(2 / pi)
        i15 = (np.cosh(s) - np.sinh(s) / s) / s ** 2
        j15 = (np.sin(s) / s - np.cos(s)) / s ** 2
        return np.where(s2 >= 0, i15, j15)
    return np.where(w < 0.5, f(np.asarray(w, dtype=np.float64)) / f(0.0), 0.0)


def pipe_menon(W, inside, box, pad, n_iter=10):
    """RELION's iterative density weights: w <- w / |blob * (W w)|, 10 times, on the padded grid."""
    npad = W.shape[0]
    k = np.fft.fftfreq(npad, 1.0 / npad)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    blob = ft_blob(r / (box * pad))
    w = inside.astype(np.float64)
    for _ in range(n_iter):
        conv = np.fft.rfftn(np.fft.irfftn(w * W, s=(npad,) * 3, axes=(0, 1, 2)) * blob, s=(npad,) * 3, axes=(0, 1, 2))
        w = np.where(inside, w / np.maximum(1e-6, np.abs(conv)), w)
    return w


def soft_mask_outside(vol, width=3.0):
    """RELION's softMaskOutsideMap (radius N/2): the background mean outside, a raised cosine over ``width``."""
    n = vol.shape[0]
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    rad = n / 2.0
    rc = np.where(r > rad + width, 1.0, np.where(r < rad, 0.0, 0.5 + 0.5 * np.cos(np.pi * (rad + width - r) / width)))
    bg = (rc * vol).sum() / rc.sum()
    return (1 - rc) * vol + rc * bg


def finish(F, W, box, pad, relion_ball, pm, mask, radial):
    F, W = F.copy(), W.copy()
    enforce_hermitian_x0(F, W)
    npad = pad * box
    rp = radius_3d(npad)
    inside = rp < pad * box / 2 if relion_ball else rp / pad <= box // 2 - 1 + 0.5
    if pm:
        V = np.where(inside, F * pipe_menon(W, inside, box, pad), 0)
    else:
        mean_w = W[inside].mean()
        V = np.where(inside, F / np.maximum(W, 1e-3 * mean_w), 0)
    vol = np.fft.fftshift(np.fft.irfftn(V, s=(npad,) * 3, axes=(0, 1, 2)))
    o = (npad - box) // 2
    vol = vol[o:o + box, o:o + box, o:o + box]
    if mask == "before":
        vol = soft_mask_outside(vol)
    c = (np.arange(box) - box // 2) / (pad * box)
    if radial:
        r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
        g = np.sinc(r) ** 2
    else:
        s = np.sinc(c) ** 2
        g = s[:, None, None] * s[None, :, None] * s[None, None, :]
    vol = vol / g
    return soft_mask_outside(vol) if mask == "after" else vol


def summary(name, curve, box):
    hi = int(np.floor(0.8 * box / 2))
    shells = [box // 4, int(0.75 * box / 2), int(0.9 * box / 2), box // 2 - 1, box // 2]
    sel = " ".join(f"{curve[s]:6.3f}" for s in shells)
    print(f"{name:28s} {sel}   min1-0.9N {curve[1:int(0.9 * box / 2) + 1].min():6.3f}   "
          f"mean1-0.8N {curve[1:hi + 1].mean():6.4f}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--box", type=int, default=48)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--snr", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--keep", default=None, help="folder to keep the data in")
    a = p.parse_args()
    d = a.keep or tempfile.mkdtemp(prefix="relion_parity_")
    os.makedirs(d, exist_ok=True)
    star, truth = make_data(d, a.box, a.n, a.snr, a.seed)
    box, pad = a.box, 2
    run([shutil.which("relion_reconstruct"), "--i", star, "--o", os.path.join(d, "relion.mrc"), "--ctf",
         "--angpix", APIX], cwd=d)
    shells = [box // 4, int(0.75 * box / 2), int(0.9 * box / 2), box // 2 - 1, box // 2]
    print(f"box {box}, {a.n} particles, SNR {a.snr or 'inf'}; FSC vs truth at shells {shells}")
    summary("relion_reconstruct", fsc(read_map(os.path.join(d, "relion.mrc"))[0].astype(np.float64), truth), box)
    acc = {}
    for r_max, x0 in [(box // 2 - 1, False), (box // 2, False), (box // 2, True), (box // 2 - 1, True)]:
        acc[(r_max, x0)] = accumulate(star, box, r_max, x0)
    variants = [
        ("ours (baseline)", dict(rmax=False, x0=False, pm=False, mask=False, radial=False)),
        ("+ rmax N/2", dict(rmax=True, x0=False, pm=False, mask=False, radial=False)),
        ("+ x0 once", dict(rmax=False, x0=True, pm=False, mask=False, radial=False)),
        ("+ pipe-menon", dict(rmax=False, x0=False, pm=True, mask=False, radial=False)),
        ("+ soft mask", dict(rmax=False, x0=False, pm=False, mask="before", radial=False)),
        ("+ radial sinc2", dict(rmax=False, x0=False, pm=False, mask=False, radial=True)),
        ("rmax + mask", dict(rmax=True, x0=False, pm=False, mask="before", radial=False)),
        ("rmax + pm", dict(rmax=True, x0=False, pm=True, mask=False, radial=False)),
        ("rmax + pm + mask", dict(rmax=True, x0=False, pm=True, mask="before", radial=False)),
        ("rmax + mask after gridding", dict(rmax=True, x0=False, pm=False, mask="after", radial=False)),
        ("all RELION parts", dict(rmax=True, x0=True, pm=True, mask="before", radial=True)),
    ]
    for name, v in variants:
        F, W = acc[(box // 2 if v["rmax"] else box // 2 - 1, v["x0"])]
        vol = finish(F, W, box, pad, v["rmax"], v["pm"], v["mask"], v["radial"])
        summary(name, fsc(vol, truth), box)
    # the library as `mpi-em reconstruct` uses it (r_max N/2 on the standard grid, soft mask): "rmax + mask after
    # gridding" above, to rounding
    star_ = read_particles(star)
    plan = make_plan(star_, 1)[0]
    geom = SliceGeometry(box, r_max=box // 2, pad=pad)
    lib = Accumulators(geom, n_vol=1)
    for sl, imgs in iter_batches(plan, 256):
        insert(lib, 0, *_image_batch(plan, sl, imgs, geom, box, APIX, True)[1:])
    vol = reconstruct(lib.F[0], lib.W[0], box, pad, r_max=box // 2, mask_outside=True)
    ref = finish(*acc[(box // 2, False)], box, pad, True, False, "after", False)
    summary("mpi_em reconstruct (job)", fsc(vol, truth), box)
    print(f"  max |job - (rmax + mask after gridding)| / max |map| = {np.abs(vol - ref).max() / np.abs(ref).max():.1e}")


if __name__ == "__main__":
    main()
