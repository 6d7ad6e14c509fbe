#!/usr/bin/env python
"""Are the E-step's posteriors calibrated? One E-step over particles with known poses, against a given map:
the mean posterior spread (RMS angle about the best pose) against the actual error of the best pose.

    python benchmarks/studies/posterior_calibration.py DATA_DIR MAP [--order 3] [--n 200] [--r 16]

DATA_DIR is a `mpi-em simulate` output (particles.star with the true poses, truth.mrc); MAP a reference (e.g. a
refine3d iteration's half map, or DATA_DIR/truth.mrc). The particles are re-centred on their true origins and
the noise spectrum is the residual power with the true poses and the true map, so only the reference differs
(--sigma-from-map: the residual power against MAP, which then includes the reference's own errors).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import mrcfile
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from mpi_em.ctf import ctf_points  # noqa: E402
from mpi_em.em.engine import SearchSpec, Stats, expectation_batch, inverse_sigma2_points  # noqa: E402
from mpi_em.em.likelihood import shell_of_points  # noqa: E402
from mpi_em.em.references import References, fine_offsets, global_grid  # noqa: E402
from mpi_em.fourier import SliceGeometry, project, volume_fft  # noqa: E402
from mpi_em.geometry import angular_distance, euler_to_matrix  # noqa: E402
from mpi_em.io import read_particles  # noqa: E402
from mpi_em.io.mrc import read_images  # noqa: E402
from mpi_em.reconstruction import centred_points  # noqa: E402
from mpi_em.sampling import angular_step  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("map")
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--r", type=float, default=16, help="current size, pixels")
    ap.add_argument("--weight-model", default=None, metavar="MODEL_STAR",
                    help="weight each shell's likelihood by the gold-standard FSC of this model STAR raised to "
                         "--weight-power (noise spectrum divided by it): a test of down-weighting unreliable shells")
    ap.add_argument("--weight-power", type=float, default=1.0)
    ap.add_argument("--sigma-from-map", action="store_true",
                    help="noise spectrum from the residuals against MAP (at the true poses), as a refinement "
                         "estimates it, instead of against the true map")
    ap.add_argument("--half", nargs=2, default=None, metavar=("RUN_DATA_STAR", "K"),
                    help="only the particles of half set K in a refinement's particles STAR (rlnRandomSubset): "
                         "with MAP a half map, particles that built it (K = its half) or not (the other half)")
    a = ap.parse_args(argv)
    truth = mrcfile.read(os.path.join(a.data, "truth.mrc")).astype(np.float64)
    ref = mrcfile.read(a.map).astype(np.float64)
    s = read_particles(os.path.join(a.data, "particles.star"))
    if a.half:
        r = read_particles(a.half[0])
        key = lambda t: np.char.add(np.char.add(t.stack.astype(str), "@"), t.index.astype(str))  # noqa: E731
        mine = set(key(r)[r.random_subset == int(a.half[1])])
        sel = np.flatnonzero(np.isin(key(s), list(mine)))
        s = dataclasses.replace(s, **{f.name: getattr(s, f.name)[sel] for f in dataclasses.fields(s)
                                      if isinstance(getattr(s, f.name), np.ndarray)})
    n, box, apix = min(a.n, len(s.rot)), truth.shape[-1], float(s.pixel_size[0])
    imgs = np.empty((n, box, box), dtype=np.float32)
    for p in set(s.stack[:n]):
        sel = np.flatnonzero(s.stack[:n] == p)
        imgs[sel] = read_images(p, s.index[sel])
    geom = SliceGeometry(box, r_max=a.r)
    X, _ = centred_points(imgs, -np.stack([s.origin_x[:n], s.origin_y[:n]], 1) / apix, geom)
    c = ctf_points(geom, apix, s.defocus_u[:n], s.defocus_v[:n], s.defocus_angle[:n], s.voltage[:n], s.cs[:n],
                   s.amp_contrast[:n])
    A = euler_to_matrix(s.rot[:n], s.tilt[:n], s.psi[:n])
    sh = shell_of_points(geom)
    nsh = box // 2 + 1
    res = (0.5 * np.abs(X - c * project(volume_fft(ref if a.sigma_from_map else truth), A, geom)) ** 2).mean(0)
    sigma2 = np.bincount(sh, weights=res, minlength=nsh) / np.maximum(np.bincount(sh, minlength=nsh), 1)
    if a.weight_model:
        import starfile

        fsc_k = starfile.read(a.weight_model)["model_class_1"]["rlnGoldStandardFsc"].to_numpy()[:nsh]
        wk = np.clip(fsc_k, 1e-3, 1.0) ** a.weight_power
        sigma2 = sigma2 / wk
    spec = SearchSpec(dim=3, n_classes=1, global_mats=global_grid(3, a.order, "C1", np), local_mats=None,
                      fine_mats=fine_offsets(3, angular_step(a.order), np), offset_range=3.0, offset_step=1.0,
                      offset_sigma=1.5, log_class_prior=np.zeros(1, np.float32))
    F = np.zeros((2,) + geom.vol_shape, complex)
    W = np.zeros((2,) + geom.vol_shape)
    st = Stats.zeros(nsh, 1)
    out = expectation_batch(X.astype(np.complex64), c, inverse_sigma2_points(np.where(sigma2 > 0, sigma2, 1), sh, np),
                            sh, References(np.stack([ref, ref]), 3, 2), np.zeros(n, np.int64), A,
                            np.zeros(n, np.int64), spec, geom, F, W, st, nsh)
    err = angular_distance(out["mats"], A)
    inl = err < 30
    print(f"{a.map}: order {a.order}, {n} particles: posterior spread {st.angle_spread / n:.2f}°, best-pose error "
          f"median {np.median(err):.2f}°, RMS below 30° {np.sqrt((err[inl] ** 2).mean()):.2f}°, "
          f"median pmax {np.median(out['pmax']):.2f}")


if __name__ == "__main__":
    main()
