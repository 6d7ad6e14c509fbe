"""Comparisons against ground truth: angular and shift errors, class accuracy (tests and benchmarks)."""
from __future__ import annotations

import numpy as np

from .geometry import angular_distance, euler_to_matrix
from .io import read_particles


def pose_errors(refined_star, truth_star, sym: str = "C1"):
    """Per-particle angular error (deg, minimised over symmetry copies) and shift error (Å), rows matched by
    rlnImageName."""
    a, b = read_particles(refined_star), read_particles(truth_star)
    key_a = a.particles["rlnImageName"].to_numpy()
    key_b = b.particles["rlnImageName"].to_numpy()
    order = np.argsort(key_b)
    idx = order[np.searchsorted(key_b, key_a, sorter=order)]
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
