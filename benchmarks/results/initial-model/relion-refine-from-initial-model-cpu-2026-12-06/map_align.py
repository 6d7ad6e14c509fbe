"""Map vs truth without the poses: each map rotated (and mirrored) onto the truth by the rotation that maximises
their correlation over integer shifts, searched on 32^3 copies low-passed to 20 Å (1 500 seeded random rotations,
then three rounds of local perturbations around the best 8, then three at full size on the maps low-passed to
8 Å around the best 4), then FSC 0.5 at full size. Used where the
pose-based alignment (mpi_em.align.align_to_truth) is unreliable: poses far from the truth make the mean rotation
between the two frames meaningless. MAP... : paths; prints one line per map."""
import sys
import numpy as np
from mpi_em.align import resample, shift_onto
from mpi_em.em.model import lowpass
from mpi_em.fsc import fsc, resolution_at
from mpi_em.io import read_map
from mpi_em.geometry import euler_to_matrix


def crop(v, n):
    F = np.fft.fftshift(np.fft.fftn(v)); c = v.shape[0] // 2
    return np.real(np.fft.ifftn(np.fft.ifftshift(F[c - n // 2:c + n // 2, c - n // 2:c + n // 2, c - n // 2:c + n // 2])))


def score(v, t):
    cc = np.fft.irfftn(np.fft.rfftn(t) * np.conj(np.fft.rfftn(v)), s=v.shape, axes=(0, 1, 2))
    return float(cc.max() / (np.linalg.norm(v) * np.linalg.norm(t)))


def random_rotations(n, rng):
    q = rng.standard_normal((n, 4)); q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
                     np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
                     np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], 1)


truth, apix = read_map('/tmp/im/data/truth.mrc')
truth = truth.astype(np.float64); box = truth.shape[0]
small = lambda v: crop(lowpass(v - v.mean(), box, apix, 20.0), 32)  # noqa: E731
ts = small(truth)
rng = np.random.default_rng(0)
for path in sys.argv[1:]:
    vol = read_map(path)[0].astype(np.float64)
    best = []
    for hand, v in (("as is", vol), ("mirrored", vol[::-1].copy())):
        vs = small(v)
        Rs = np.concatenate([np.eye(3)[None], random_rotations(1500, rng)])
        sc = [score(resample(vs, R), ts) for R in Rs]
        top = [(sc[i], Rs[i]) for i in np.argsort(sc)[-8:]]
        for step in (8.0, 4.0, 2.0):
            cand = [R for _, R in top]
            for _, R in top:
                for _ in range(40):
                    a = np.deg2rad(step) * rng.standard_normal(3)
                    cand.append(np.asarray(euler_to_matrix(*np.rad2deg(a))).reshape(3, 3) @ R)
            s2 = [score(resample(vs, R), ts) for R in cand]
            top = [(s2[i], cand[i]) for i in np.argsort(s2)[-8:]]
        # then at full size (the maps low-passed to 8 Å), smaller steps around the best 4
        vf, tf = lowpass(v - v.mean(), box, apix, 8.0), lowpass(truth - truth.mean(), box, apix, 8.0)
        top = [(score(resample(vf, R), tf), R) for _, R in top[-4:]]
        top.sort(key=lambda x: x[0])
        for step in (2.0, 1.0, 0.5):
            cand = [R for _, R in top]
            for _, R in top:
                for _ in range(12):
                    a = np.deg2rad(step) * rng.standard_normal(3)
                    cand.append(np.asarray(euler_to_matrix(*np.rad2deg(a))).reshape(3, 3) @ R)
            s2 = [score(resample(vf, R), tf) for R in cand]
            top = [(s2[i], cand[i]) for i in np.argsort(s2)[-4:]]
        s, R = top[-1]
        best.append((s, hand, R, v))
    s, hand, R, v = max(best, key=lambda b: b[0])
    a = shift_onto(resample(v, R), truth)
    print(path, hand, 'cc %.3f' % s, 'FSC0.5 vs truth %.2f A' % resolution_at(fsc(a, truth), box, apix))
