"""Simulated data with known truth: a pseudo-atomic phantom, poses, CTFs, noise, written as STAR + MRC.

This is the embedded default data set (README, tests, benchmarks). Everything is reproducible from a seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .ctf import ctf_images
from .fourier import SliceGeometry, image_ifft, project, shift_phases, volume_fft
from .geometry import euler_to_matrix, random_rotations


def phantom(box: int, seed: int = 0, n_atoms: int | None = None, sym: str = "C1", radius: float | None = None,
            bfactor_px: float = 1.0, n_domains: int = 5, remove_domain: int | None = None,
            domain_spread: float = 0.3, domain_distance: float = 0.55, xp=np) -> np.ndarray:
    """A pseudo-atomic density: Gaussian 'atoms' grouped in domains inside a sphere, float32 (box^3).

    Atoms are splatted onto the grid and blurred by a Gaussian of ``bfactor_px`` pixels, which gives the
    volume a protein-like power spectrum (Guinier fall-off). With ``sym`` != C1 the atoms of one asymmetric
    unit are copied by the group's rotations about the box centre.

    Domain centres lie at ``domain_distance`` x (0.3..1) x radius from the centre and their atoms scatter with
    a standard deviation of ``domain_spread`` x radius: the defaults give a compact globule; fewer, tighter,
    more distant domains (e.g. 4, 0.12, 0.8) give a lumpy particle whose projections differ strongly by view.

    ``remove_domain`` (0-based; -1 = the domain with the most atoms): the same phantom (same seed, same atoms,
    same scale) without that domain's atoms — a second conformation for classification tests. The scale is
    that of the complete phantom (unit standard deviation), so both conformations share one density scale.
    ``xp``: the array module of the blur's FFT (CuPy for large boxes); the result is a NumPy array either way.
    """
    rng = np.random.default_rng(seed)
    radius = 0.33 * box if radius is None else radius
    mats = [np.eye(3)]
    if sym.upper() != "C1":
        from .symmetry import symmetry_matrices

        mats = list(symmetry_matrices(sym))
    if n_atoms is None:
        n_atoms = int(0.9 * (radius ** 3)) // len(mats) + 1
    # domains: centres inside the sphere, atoms scattered around them
    centres = rng.normal(size=(n_domains, 3))
    centres *= (domain_distance * radius * rng.uniform(0.3, 1.0, (n_domains, 1))) / np.linalg.norm(centres, axis=1,
                                                                                      keepdims=True)
    which = rng.integers(0, n_domains, n_atoms)
    pts = centres[which] + rng.normal(scale=domain_spread * radius, size=(n_atoms, 3))
    inside = np.linalg.norm(pts, axis=1) < radius * 0.95
    pts, which = pts[inside], which[inside]
    weights = rng.uniform(0.6, 1.4, len(pts))
    full = _splat(pts, weights, mats, box, bfactor_px, xp)
    scale = full.std()
    if remove_domain is None:
        return (full / scale).astype(np.float32)
    if remove_domain < 0:
        remove_domain = int(np.argmax(np.bincount(which, minlength=n_domains)))
    if not 0 <= remove_domain < n_domains:
        raise ValueError(f"remove_domain {remove_domain} outside 0..{n_domains - 1}")
    keep = which != remove_domain
    return (_splat(pts[keep], weights[keep], mats, box, bfactor_px, xp) / scale).astype(np.float32)


def _splat(pts, weights, mats, box: int, bfactor_px: float, xp=np) -> np.ndarray:
    """Atoms (x, y, z about the centre) and their symmetry copies, trilinearly splatted and Gaussian-blurred."""
    all_pts = np.concatenate([pts @ L.T for L in mats])  # (x, y, z) about the centre
    all_w = np.tile(weights, len(mats))
    c = all_pts + box // 2
    c0 = np.floor(c).astype(np.int64)
    f = c - c0
    idx, wts = [], []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                wts.append(all_w * np.where(dz, f[:, 2], 1 - f[:, 2]) * np.where(dy, f[:, 1], 1 - f[:, 1])
                           * np.where(dx, f[:, 0], 1 - f[:, 0]))
                idx.append(((c0[:, 2] + dz) * box + c0[:, 1] + dy) * box + c0[:, 0] + dx)
    vol = np.bincount(np.concatenate(idx), weights=np.concatenate(wts), minlength=box ** 3)
    del idx, wts
    k = xp.fft.fftfreq(box)
    kz, ky, kx = xp.meshgrid(k, k, xp.fft.rfftfreq(box), indexing="ij")
    blur = xp.exp(-2 * np.pi ** 2 * bfactor_px ** 2 * (kx ** 2 + ky ** 2 + kz ** 2))
    del kz, ky, kx
    vol = xp.fft.irfftn(xp.fft.rfftn(xp.asarray(vol.reshape((box,) * 3))) * blur, s=(box,) * 3, axes=(0, 1, 2))
    return vol if xp is np else xp.asnumpy(vol)


def separated_views(n_views: int, seed: int = 0, order: int = 3) -> tuple[np.ndarray, np.ndarray, float]:
    """``n_views`` projection directions (rot, tilt in degrees) spread as far apart as possible.

    Greedy farthest-point selection on the HEALPix directions of ``order`` with the axial distance
    min(angle(d1, d2), angle(d1, -d2)): a direction and its opposite give mirror images, which are kept apart
    too. The first direction is drawn with ``seed``. Returns (rot, tilt, smallest axial separation in degrees).
    """
    from .sampling import direction_vectors, healpix_directions

    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    rot, tilt = healpix_directions(order)
    upper = tilt <= 90.0
    rot, tilt = rot[upper], tilt[upper]
    d = direction_vectors(rot, tilt, xp=np)
    if n_views > len(d):
        raise ValueError(f"at most {len(d)} views at HEALPix order {order}, asked for {n_views}")
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(d)))]
    closest = np.full(len(d), np.inf)
    for _ in range(n_views - 1):
        c = np.abs(d @ d[chosen[-1]])
        closest = np.minimum(closest, np.rad2deg(np.arccos(np.clip(c, -1.0, 1.0))))
        chosen.append(int(np.argmax(closest)))
    sel = np.asarray(chosen)
    if n_views > 1:
        c = np.abs(d[sel] @ d[sel].T)
        np.fill_diagonal(c, -1.0)
        sep = float(np.rad2deg(np.arccos(np.clip(c.max(), -1.0, 1.0))))
    else:
        sep = 180.0
    return rot[sel], tilt[sel], sep


def view_poses(n: int, n_views: int, seed: int = 0):
    """Poses of ``n`` particles drawn from ``n_views`` separated directions (balanced: particle i has view
    i mod n_views, shuffled), with uniform random in-plane angles. Returns (rot, tilt, psi, view (0-based),
    view rot, view tilt, smallest separation)."""
    vrot, vtilt, sep = separated_views(n_views, seed)
    rng = np.random.default_rng(seed + 1)
    view = rng.permutation(np.arange(n) % n_views)
    psi = rng.uniform(-180.0, 180.0, n)
    return vrot[view], vtilt[view], psi, view, vrot, vtilt, sep


def clean_projections(volume, rot, tilt, psi=None, xp=np) -> np.ndarray:
    """Noiseless, centred, CTF-free projections (n, box, box) float32 of one volume (psi defaults to 0)."""
    box = volume.shape[-1]
    rot = np.atleast_1d(np.asarray(rot, dtype=np.float64))
    tilt = np.atleast_1d(np.asarray(tilt, dtype=np.float64))
    psi = np.zeros_like(rot) if psi is None else np.atleast_1d(np.asarray(psi, dtype=np.float64))
    geom = SliceGeometry(box, xp=xp)
    F = volume_fft(xp.asarray(volume, dtype=xp.float64))
    vals = project(F, euler_to_matrix(rot, tilt, psi, xp=xp), geom)
    imgs = image_ifft(geom.scatter(vals), box)
    return np.asarray(imgs.get() if hasattr(imgs, "get") else imgs, dtype=np.float32)


@dataclass
class SimulatedParticles:
    images: np.ndarray  # (n, box, box) float32
    rot: np.ndarray
    tilt: np.ndarray
    psi: np.ndarray
    shift_x: np.ndarray  # pixels: image = projection moved by +shift (RELION origin = -shift x pixel size)
    shift_y: np.ndarray
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    noise_sigma: float
    class_number: np.ndarray | None = None


def simulate_particles(volumes, n: int, pixel_size: float, snr: float = 0.1, seed: int = 0,
                       max_shift: float = 0.0, defocus_range=(8000.0, 25000.0), astigmatism: float = 300.0,
                       voltage: float = 300.0, cs: float = 2.7, amp_contrast: float = 0.1, ctf: bool = True,
                       poses=None, class_of=None, batch: int = 512, xp=np) -> SimulatedParticles:
    """Noisy CTF-modulated projections of one volume (or of K volumes, picked by ``class_of``)."""
    rng = np.random.default_rng(seed)
    vols = volumes if isinstance(volumes, (list, tuple)) else [volumes]
    box = vols[0].shape[-1]
    if poses is None:
        rot, tilt, psi = random_rotations(n, rng)
    else:
        rot, tilt, psi = (np.asarray(p, dtype=np.float64) for p in poses)
    sx = rng.uniform(-max_shift, max_shift, n) if max_shift > 0 else np.zeros(n)
    sy = rng.uniform(-max_shift, max_shift, n) if max_shift > 0 else np.zeros(n)
    du = rng.uniform(*defocus_range, n)
    dv = du - rng.uniform(0, astigmatism, n)
    dang = rng.uniform(0, 180, n)
    if class_of is None:
        class_of = np.zeros(n, dtype=np.int64)
    geom = SliceGeometry(box, xp=xp)
    Fv = [volume_fft(xp.asarray(v, dtype=xp.float64)) for v in vols]
    clean = np.empty((n, box, box), dtype=np.float32)
    for s in range(0, n, batch):
        e = min(n, s + batch)
        A = euler_to_matrix(rot[s:e], tilt[s:e], psi[s:e], xp=xp)
        vals = xp.zeros((e - s, geom.m), dtype=xp.complex128)
        for k, F in enumerate(Fv):
            sel = xp.asarray(class_of[s:e] == k)
            if bool(sel.any()):
                vals[sel] = project(F, A[sel], geom)
        F2 = geom.scatter(vals)
        if ctf:
            F2 = F2 * ctf_images(box, pixel_size, du[s:e], dv[s:e], dang[s:e], voltage, cs, amp_contrast, xp=xp)
        F2 = F2 * shift_phases(box, np.stack([sx[s:e], sy[s:e]], 1), xp=xp, dtype=xp.complex128)
        imgs = image_ifft(F2, box)
        clean[s:e] = np.asarray(imgs.get() if hasattr(imgs, "get") else imgs, dtype=np.float32)
    signal_var = float(clean.var(axis=(1, 2)).mean())
    sigma = float(np.sqrt(signal_var / snr)) if snr > 0 else 0.0
    images = clean + rng.normal(scale=sigma, size=clean.shape).astype(np.float32) if sigma > 0 else clean
    return SimulatedParticles(images.astype(np.float32), rot, tilt, psi, sx, sy, du, dv, dang, sigma,
                              class_number=class_of + 1)


def write_dataset(out_dir: str, vol_or_vols, sim: SimulatedParticles, pixel_size: float, voltage: float = 300.0,
                  cs: float = 2.7, amp_contrast: float = 0.1, per_stack: int = 1000, seed: int = 0,
                  write_subsets: bool = True, start_resolution: float | None = None) -> str:
    """Write particles.star, stacks/particles_NNN.mrcs and truth map(s); return the STAR path. With
    ``start_resolution`` (Å) also start.mrc: :func:`start_map` of the truth map(s)."""
    from .io import particles_table, write_map, write_particles, write_stack

    os.makedirs(os.path.join(out_dir, "stacks"), exist_ok=True)
    n, box = sim.images.shape[0], sim.images.shape[-1]
    names = []
    for k, s in enumerate(range(0, n, per_stack)):
        e = min(n, s + per_stack)
        rel = f"stacks/particles_{k:04d}.mrcs"
        write_stack(os.path.join(out_dir, rel), sim.images[s:e], pixel_size)
        names += [f"{i + 1:06d}@{rel}" for i in range(e - s)]
    cols = {
        "rlnImageName": np.array(names),
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
        "rlnDefocusU": sim.defocus_u, "rlnDefocusV": sim.defocus_v, "rlnDefocusAngle": sim.defocus_angle,
        "rlnPhaseShift": np.zeros(n), "rlnCtfBfactor": np.zeros(n),
        "rlnAngleRot": sim.rot, "rlnAngleTilt": sim.tilt, "rlnAnglePsi": sim.psi,
        "rlnOriginXAngst": -sim.shift_x * pixel_size, "rlnOriginYAngst": -sim.shift_y * pixel_size,
    }
    if sim.class_number is not None:
        cols["rlnClassNumber"] = sim.class_number.astype(np.int64)
    if write_subsets:
        rng = np.random.default_rng(seed + 7)
        sub = np.empty(n, dtype=np.int64)
        perm = rng.permutation(n)
        sub[perm] = np.arange(n) % 2 + 1
        cols["rlnRandomSubset"] = sub
    optics = [{"rlnOpticsGroup": 1, "rlnOpticsGroupName": "opticsGroup1", "rlnVoltage": voltage,
               "rlnSphericalAberration": cs, "rlnAmplitudeContrast": amp_contrast,
               "rlnImagePixelSize": pixel_size, "rlnImageSize": box, "rlnImageDimensionality": 2}]
    star_path = os.path.join(out_dir, "particles.star")
    write_particles(star_path, particles_table(optics, cols))
    # the same particles as a picker would give them: no poses, origins or classes (input for refinement and
    # classification; particles.star keeps the ground truth)
    truth_only = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                  "rlnClassNumber", "rlnRandomSubset")
    bare = {k: v for k, v in cols.items() if k not in truth_only}
    write_particles(os.path.join(out_dir, "particles_unaligned.star"), particles_table(optics, bare))
    vols = vol_or_vols if isinstance(vol_or_vols, (list, tuple)) else [vol_or_vols]
    if len(vols) == 1:
        write_map(os.path.join(out_dir, "truth.mrc"), vols[0], pixel_size)
    else:
        for k, v in enumerate(vols):
            write_map(os.path.join(out_dir, f"truth_class{k + 1:03d}.mrc"), v, pixel_size)
    if start_resolution is not None:
        write_map(os.path.join(out_dir, "start.mrc"), start_map(vols, pixel_size, start_resolution), pixel_size)
    return star_path


def start_map(vols, pixel_size: float, resolution_A: float) -> np.ndarray:
    """A start map that knows the particle only to ``resolution_A``: the truth (the mean of the truth maps
    ``vols``, one per conformation, so that it favours none of them), as the float32 maps written to truth.mrc,
    low-passed in double precision (:func:`mpi_em.em.model.lowpass`); float32."""
    from .backend import to_host
    from .em.model import lowpass

    mean = np.mean([to_host(v).astype(np.float32).astype(np.float64) for v in vols], axis=0)
    return lowpass(mean, mean.shape[0], pixel_size, resolution_A).astype(np.float32)
