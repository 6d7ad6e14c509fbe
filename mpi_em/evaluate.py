"""Comparisons against ground truth: angular and shift errors, class accuracy (tests and benchmarks)."""
from __future__ import annotations

import numpy as np

from .geometry import angular_distance, euler_to_matrix
from .io import read_particles


def _paired(star, truth_star):
    """(particles of ``star``, particles of ``truth_star``, for each row of the first the row of the second that
    reads the same image: the resolved stack file and the index in it)."""
    a, b = read_particles(star), read_particles(truth_star)
    key_a = np.char.add(np.char.add(a.stack.astype(str), "@"), a.index.astype(str))
    key_b = np.char.add(np.char.add(b.stack.astype(str), "@"), b.index.astype(str))
    order = np.argsort(key_b)
    pos = np.minimum(np.searchsorted(key_b, key_a, sorter=order), len(key_b) - 1)
    idx = order[pos]
    missing = np.flatnonzero(key_b[idx] != key_a)
    if missing.size:
        i = int(missing[0])
        raise ValueError(f"{star}: row {i + 1} ({a.particles['rlnImageName'].iloc[i]}) reads an image "
                         f"that is not in {truth_star}")
    return a, b, idx


def view_spread(classified_star, truth_star) -> float:
    """How well 2D classes group particles by view: the mean angle (degrees) between each particle's true
    projection direction (the third row of its true rotation) and the mean direction of its class's members.
    Lower is better; classes drawn at random give ~80-90 degrees on uniformly spread views."""
    a, b, idx = _paired(classified_star, truth_star)
    v = euler_to_matrix(b.rot[idx], b.tilt[idx], b.psi[idx])[:, 2, :]
    cls = a.particles["rlnClassNumber"].to_numpy()
    total = 0.0
    for c in np.unique(cls):
        vc = v[cls == c]
        m = vc.sum(axis=0)
        m /= max(np.linalg.norm(m), 1e-30)
        total += np.degrees(np.arccos(np.clip(vc @ m, -1.0, 1.0))).sum()
    return total / len(cls)


def pose_errors(refined_star, truth_star, sym: str = "C1"):
    """Per-particle angular error (deg, minimised over symmetry copies) and shift error (Å). Rows are paired by
    the image they read (the resolved stack file and the index in it), so the files may list the particles in
    any order and name them relative to different folders. Raises ValueError for a refined row whose image is
    not in the truth file."""
    a, b, idx = _paired(refined_star, truth_star)
    A = euler_to_matrix(a.rot, a.tilt, a.psi)
    B = euler_to_matrix(b.rot[idx], b.tilt[idx], b.psi[idx])
    mats = None
    if sym.upper() != "C1":
        from .symmetry import symmetry_matrices

        mats = symmetry_matrices(sym)
    ang = angular_distance(A, B, sym=mats)
    sh = np.hypot(a.origin_x - b.origin_x[idx], a.origin_y - b.origin_y[idx])
    return ang, sh


def class_accuracy(assigned, truth) -> float:
    """Fraction of particles whose class agrees with the truth after matching each class to the true label
    that most of its members have (majority matching; several classes may map to one label)."""
    assigned = np.asarray(assigned)
    truth = np.asarray(truth)
    correct = 0
    for c in np.unique(assigned):
        sel = assigned == c
        correct += np.bincount(truth[sel]).max()
    return correct / len(truth)


def match_classes(assigned, truth) -> dict:
    """Majority matching: {class: the true label most of its members have}."""
    assigned = np.asarray(assigned)
    truth = np.asarray(truth)
    return {int(c): int(np.bincount(truth[assigned == c]).argmax()) for c in np.unique(assigned)}


def rotational_correlation(image, ref, angle_step: float = 2.0, max_shift: int | None = None,
                           mask_radius=None) -> float:
    """Largest Pearson correlation of ``image`` with ``ref`` over in-plane rotations of ``ref`` (every
    ``angle_step`` degrees, bilinear) and integer (circular) shifts up to ``max_shift`` px (default: any), inside
    a circle of ``mask_radius`` px (default: box/2 - 1). For comparing a class average with a true view whose
    in-plane angle and centre the classification is free to choose (class averages are re-centred on their
    centre of mass, the true views on the box centre)."""
    a = np.asarray(image, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    box = a.shape[-1]
    r = box / 2 - 1 if mask_radius is None else mask_radius
    yy, xx = np.mgrid[:box, :box] - box // 2
    inside = (yy ** 2 + xx ** 2) <= r * r
    ms = box // 2 if max_shift is None else int(max_shift)
    shifts = [(dy, dx) for dy in range(-ms, ms + 1) for dx in range(-ms, ms + 1)
              if max_shift is None or dy * dy + dx * dx <= ms * ms]
    av = a[inside] - a[inside].mean()
    best = -1.0
    fa = np.fft.rfft2(a * inside)
    sy = np.array([s[0] for s in shifts]) % box
    sx = np.array([s[1] for s in shifts]) % box
    for ang in np.arange(0.0, 360.0, angle_step):
        br = rotate_image(b, ang)
        cc = np.fft.irfft2(fa * np.conj(np.fft.rfft2(br)), s=a.shape)
        j = int(np.argmax(cc[sy, sx]))
        dy, dx = int(sy[j]), int(sx[j])
        bs = np.roll(br, (dy, dx), axis=(0, 1))[inside]
        bs = bs - bs.mean()
        c = float(av @ bs / np.sqrt((av @ av) * (bs @ bs) + 1e-300))
        best = max(best, c)
    return best


def rotate_image(img, angle_deg: float) -> np.ndarray:
    """Rotate a square image about its centre (index N//2) by ``angle_deg`` (bilinear, zero outside)."""
    img = np.asarray(img, dtype=np.float64)
    box = img.shape[-1]
    c = box // 2
    yy, xx = np.mgrid[:box, :box].astype(np.float64) - c
    t = np.deg2rad(angle_deg)
    # source coordinates of each output pixel (inverse rotation)
    xs = np.cos(t) * xx + np.sin(t) * yy + c
    ys = -np.sin(t) * xx + np.cos(t) * yy + c
    x0, y0 = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    fx, fy = xs - x0, ys - y0
    out = np.zeros_like(img)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = y0 + dy, x0 + dx
            ok = (yi >= 0) & (yi < box) & (xi >= 0) & (xi < box)
            out += np.where(ok, img[np.clip(yi, 0, box - 1), np.clip(xi, 0, box - 1)], 0.0) * wy * wx
    return out
