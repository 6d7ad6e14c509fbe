"""CTF against RELION's formula (src/ctf.h) at points computed by hand.

lambda(300 kV) = 12.2643247 / sqrt(3e5 * (1 + 3e5 * 0.978466e-6)) = 0.0196876 Å.
CTF = -sin(pi*lambda*deltaf*u^2 + pi/2*Cs*lambda^3*u^4 - phase - atan(Q0/sqrt(1-Q0^2))) * exp(-B/4*u^2),
deltaf = -((dU+dV)/2 + (dU-dV)/2 * cos(2*(angle - azimuth)))   (underfocus dU, dV > 0).
"""
import numpy as np
import pytest

from mpi_em.backend import to_host
from mpi_em.ctf import ctf_images, ctf_values, electron_wavelength

LAM = 0.0196876153  # 12.2643247 / sqrt(388061.94) = 12.2643247 / 622.94618


def test_wavelength_300kv():
    assert electron_wavelength(300.0) == pytest.approx(LAM, rel=1e-7)


def test_origin_equals_amplitude_contrast():
    # u = 0: -sin(-atan(Q0/sqrt(1-Q0^2))) = Q0
    assert ctf_values(0.0, 0.0, 15000, 15000, 0, 300, 2.7, 0.1) == pytest.approx(0.1, abs=1e-15)


def test_defocus_only_peak_and_zero():
    d = 10000.0
    # Cs = 0, Q0 = 0: CTF = sin(pi*lambda*d*u^2): 1 at u^2 = 1/(2 lambda d), 0 at u^2 = 1/(lambda d)
    f_peak = 1.0 / np.sqrt(2 * LAM * d)
    f_zero = 1.0 / np.sqrt(LAM * d)
    assert ctf_values(f_peak, 0.0, d, d, 0, 300, 0.0, 0.0) == pytest.approx(1.0, abs=1e-9)
    assert ctf_values(0.0, f_zero, d, d, 0, 300, 0.0, 0.0) == pytest.approx(0.0, abs=1e-6)


def test_spherical_aberration_term():
    # d = 0, Q0 = 0: CTF = -sin(pi/2*Cs*lambda^3*u^4) = -1 when u^4 = 1/(Cs[Å] lambda^3)
    cs_mm = 2.7
    f = (1.0 / (cs_mm * 1e7 * LAM ** 3)) ** 0.25
    assert ctf_values(f, 0.0, 0, 0, 0, 300, cs_mm, 0.0) == pytest.approx(-1.0, abs=1e-9)


def test_astigmatism_direction():
    # along the azimuth (30 deg) the defocus is dU; perpendicular to it, dV
    f = 0.05
    a = np.deg2rad(30.0)
    along = ctf_values(f * np.cos(a), f * np.sin(a), 12000, 8000, 30.0, 300, 2.7, 0.1)
    across = ctf_values(-f * np.sin(a), f * np.cos(a), 12000, 8000, 30.0, 300, 2.7, 0.1)
    assert along == pytest.approx(ctf_values(f, 0.0, 12000, 12000, 0, 300, 2.7, 0.1), abs=1e-12)
    assert across == pytest.approx(ctf_values(f, 0.0, 8000, 8000, 0, 300, 2.7, 0.1), abs=1e-12)


def test_phase_shift_and_bfactor():
    # phase 90 deg, nothing else: -sin(-pi/2) = 1 everywhere; B = 100: times exp(-25 u^2)
    f = 0.1
    assert ctf_values(f, 0.0, 0, 0, 0, 300, 0.0, 0.0, phase_shift=90.0) == pytest.approx(1.0, abs=1e-12)
    assert ctf_values(f, 0.0, 0, 0, 0, 300, 0.0, 0.0, phase_shift=90.0, bfactor=100.0) == \
        pytest.approx(np.exp(-25 * f * f), abs=1e-12)


def test_grid_layout(xp):
    box, apix = 64, 1.5
    c = to_host(ctf_images(box, apix, [15000.0], [14000.0], [20.0], 300, 2.7, 0.1, xp=xp, dtype=np.float64))
    assert c.shape == (1, 64, 33)
    # column j, row i <-> fx = j/(box apix), fy = (i if i < 32 else i - 64)/(box apix)
    for i, j in [(0, 5), (3, 7), (60, 12), (32, 0)]:
        fy = (i if i < 32 else i - 64) / (box * apix)
        assert c[0, i, j] == pytest.approx(ctf_values(j / (box * apix), fy, 15000, 14000, 20, 300, 2.7, 0.1),
                                           abs=1e-12)


def test_ctf_points_are_the_grid_values_at_the_in_ball_points():
    """The E-step evaluates CTFs at the in-ball points only: the same formula on the same frequencies, so
    bit-identical to gathering the full rfft2 grid."""
    from mpi_em.ctf import ctf_points
    from mpi_em.fourier import SliceGeometry

    geom = SliceGeometry(48, r_max=17)
    args = (1.3, [15000.0, 9000.0], [14000.0, 8800.0], [20.0, 100.0], 300.0, 2.7, 0.1, [0.0, 30.0], [0.0, 50.0])
    grid = ctf_images(48, *args)
    assert np.array_equal(ctf_points(geom, *args), geom.gather(grid))
