"""mpi_em.align.refine_alignment: a map made from a known truth by a known rotation and a shift below and above a
pixel is put back onto it from a start several degrees off (the error of a pose-based start when many poses are
wrong): the rotation and shift are recovered, and the FSC with the truth is that of trilinear resampling alone."""
import numpy as np

from mpi_em.align import refine_alignment, resample
from mpi_em.fsc import fsc, resolution_at
from mpi_em.geometry import angular_distance, euler_to_matrix
from mpi_em.simulate import phantom
from mpi_em.symaxis import shift_map


def test_refine_alignment_recovers_a_known_rotation_and_shift():
    n, apix = 32, 2.5
    truth = phantom(n, seed=5).astype(np.float64)
    R = euler_to_matrix(40.0, 70.0, -25.0)[0]
    t = np.array([1.3, -0.6, 2.2])                          # x, y, z pixels
    vol = shift_map(resample(truth, R.T), t)                # vol(y) = truth(R^T (y - t)): resample(vol, R) ~ truth
    start = R @ euler_to_matrix(3.0, 5.0, -2.0)[0]          # ~6 degrees off
    assert angular_distance(start, R)[0] > 5.0
    aligned, M, moved, cc = refine_alignment(vol, truth, start)
    err = float(angular_distance(M, R)[0])
    # the map is moved back by t turned into the truth's frame (the integer part from the cross-correlation's peak,
    # the rest from the search below a pixel)
    round_trip = resample(resample(truth, R.T), R)           # trilinear twice, no alignment error
    res = resolution_at(fsc(aligned, truth), n, apix, 0.5)
    res_rt = resolution_at(fsc(round_trip, truth), n, apix, 0.5)
    print(f"rotation error {err:.2f} deg, shift {moved} vs {-(R.T @ t)}, cc {cc:.4f}, FSC 0.5 {res:.2f} Å "
          f"(resampling alone {res_rt:.2f} Å)")
    # the same tolerance for both: the rotation error moves the phantom's edge (~0.4 n from the centre) <= 0.15 px
    assert err < np.degrees(0.15 / (0.4 * n)), err
    np.testing.assert_allclose(moved, -(R.T @ t), atol=0.15)
    assert res <= res_rt + 0.1, (res, res_rt)
