"""Point groups of mpi_em.symmetry against RELION's src/symmetries.cpp (SymList::fill_symmetry_class)."""
import numpy as np
import pytest

from mpi_em.symmetry import PHI, rotation_about_axis, symmetry_matrices, symmetry_order

ALL = ["C1", "C2", "C7", "C12", "D2", "D7", "T", "O", "I", "I1", "I2", "I3", "I4"]
ORDERS = {"C1": 1, "C7": 7, "D7": 14, "T": 12, "O": 24, "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60}


def contains(G, M, tol=1e-9):
    return bool(np.abs(G - np.asarray(M, dtype=np.float64)).max(axis=(1, 2)).min() < tol)


def same_set(A, B):
    return len(A) == len(B) and all(contains(B, a) for a in A)


def rz(deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def fold_axes(G, fold):
    """Unit axes (sign made canonical) of the elements of G that rotate by exactly 360/fold degrees. The angle is
    atan2(sin, cos) of the rotation (sin from the antisymmetric part): well conditioned everywhere, where
    arccos((trace - 1) / 2) near 180° turns a 1e-16 rounding of the trace into ~1e-6° (numpy 2.4's rounding of
    the group's products put one two-fold element of I2 just outside a 1e-6° tolerance)."""
    axes = []
    for m in G:
        sin = 0.5 * np.linalg.norm([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])
        ang = np.degrees(np.arctan2(sin, (np.trace(m) - 1) / 2))
        if abs(ang - 360.0 / fold) < 1e-6:
            if fold == 2:  # axis = eigenvector of eigenvalue 1
                w, v = np.linalg.eigh((m + m.T) / 2 + np.eye(3))
                a = v[:, np.argmax(w)]
            else:
                a = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])
            a = a / np.linalg.norm(a)
            k = np.flatnonzero(np.abs(a) > 1e-9)[0]
            axes.append(a * np.sign(a[k]))
    return np.array(axes)


def has_axis(G, fold, axis, tol=1e-6):
    """RELION writes its axes with 6-10 significant digits (accurate to ~1e-8), hence the default tol;
    distinct symmetry axes of these groups are degrees apart, so 1e-6 cannot confuse them."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    ax = fold_axes(G, fold)
    return bool(len(ax)) and bool(np.min(np.minimum(np.abs(ax - a).max(1), np.abs(ax + a).max(1))) < tol)


@pytest.mark.parametrize("name,order", sorted(ORDERS.items()))
def test_orders(name, order):
    G = symmetry_matrices(name)
    assert G.shape == (order, 3, 3) and G.dtype == np.float64
    assert symmetry_order(name) == order


@pytest.mark.parametrize("n", [1, 2, 3, 5, 13, 40])
def test_cn_dn_orders(n):
    assert len(symmetry_matrices(f"C{n}")) == symmetry_order(f"C{n}") == n
    if n >= 2:
        assert len(symmetry_matrices(f"D{n}")) == symmetry_order(f"D{n}") == 2 * n


@pytest.mark.parametrize("name", ALL)
def test_orthogonal_det_identity_first_closed_unique(name):
    G = symmetry_matrices(name)
    eye = np.eye(3)
    assert np.array_equal(G[0], eye)
    assert np.abs(np.einsum("nij,nkj->nik", G, G) - eye).max() < 1e-12
    assert np.abs(np.linalg.det(G) - 1.0).max() < 1e-12
    prods = np.einsum("aij,bjk->abik", G, G).reshape(-1, 3, 3)
    d = np.abs(prods[:, None] - G[None]).max(axis=(2, 3)).min(axis=1)
    assert d.max() < 1e-12  # closure
    pair = np.abs(G[:, None] - G[None]).max(axis=(2, 3)) + np.eye(len(G)) * 10
    assert pair.min() > 1e-3  # no duplicates


def test_case_insensitive_and_deterministic():
    for a, b in [("c7", "C7"), ("d4", "D4"), ("t", "T"), ("o", "O"), ("i", "I2"), ("I", "i2"), ("i3", "I3")]:
        assert np.array_equal(symmetry_matrices(a), symmetry_matrices(b))
    G = symmetry_matrices("I1")
    G[1] = 0  # callers get a copy; the cached group is untouched
    assert np.abs(symmetry_matrices("I1")[1]).max() > 0.5
    assert np.array_equal(symmetry_matrices("O"), symmetry_matrices("O"))


def test_cn_about_z():
    # fill_symmetry_class, pg_CN: "rot_axis n 0 0 1"
    assert contains(symmetry_matrices("C7"), rz(360 / 7))
    assert contains(symmetry_matrices("C4"), [[0, -1, 0], [1, 0, 0], [0, 0, 1]])


def test_dn_twofold_about_x():
    # fill_symmetry_class, pg_DN: "rot_axis n 0 0 1", "rot_axis 2 1 0 0"
    for n in (2, 3, 7):
        G = symmetry_matrices(f"D{n}")
        assert contains(G, np.diag([1.0, -1.0, -1.0]))
        assert contains(G, rz(360 / n))


def test_t_relion_axes():
    # fill_symmetry_class, pg_T: "rot_axis 3  0. 0. 1.", "rot_axis 2 0. 0.816496 0.577350"
    # NB: RELION's T has its 3-fold on z, so (unlike the textbook setting) it contains neither the cyclic
    # permutation (3-fold along (1,1,1)) nor 2-folds about x, y, z.
    G = symmetry_matrices("T")
    assert contains(G, rz(120))
    assert has_axis(G, 2, (0.0, 0.816496, 0.577350))
    assert has_axis(G, 2, (0.0, np.sqrt(2 / 3), np.sqrt(1 / 3)), tol=1e-12)
    # fold_axes counts group elements, not axes: 4 three-fold axes x 2 elements, 3 two-fold axes
    assert len(fold_axes(G, 3)) == 8 and len(fold_axes(G, 2)) == 3
    P = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert not contains(G, P)
    assert not contains(G, np.diag([1.0, -1.0, -1.0]))
    # it is the textbook T (3-fold along (1,1,1), 2-folds on x, y, z) turned so that (1,1,1) goes to z
    # and the x 2-fold goes to RELION's (0, 0.816496, 0.577350)
    Tstd = np.array([np.eye(3), P, P.T] + [np.diag(np.array(d, float)) for d in ([1, -1, -1], [-1, 1, -1], [-1, -1, 1])])
    Tstd = np.unique(np.round(np.einsum("aij,bjk->abik", Tstd, Tstd).reshape(-1, 3, 3), 12), axis=0)
    assert len(Tstd) == 12

    def frame(a, b):
        a = a / np.linalg.norm(a)
        b = b - (b @ a) * a
        b = b / np.linalg.norm(b)
        return np.stack([a, b, np.cross(a, b)], axis=1)

    R = frame(np.array([0.0, 0.0, 1.0]), np.array([0.0, np.sqrt(2 / 3), np.sqrt(1 / 3)])) @ frame(
        np.ones(3), np.array([1.0, 0.0, 0.0])).T
    assert same_set(np.einsum("ij,njk,lk->nil", R, Tstd, R), G)


def test_o_fourfolds_on_xyz():
    # fill_symmetry_class, pg_O: "rot_axis 3  .5773502  .5773502 .5773502", "rot_axis 4 0 0 1"
    G = symmetry_matrices("O")
    assert contains(G, [[0, -1, 0], [1, 0, 0], [0, 0, 1]])  # 4-fold about z
    for axis in np.eye(3):
        assert has_axis(G, 4, axis)
    assert contains(G, [[0, 0, 1], [1, 0, 0], [0, 1, 0]])  # 3-fold along (1,1,1)


def test_i2_crowther_222():
    # fill_symmetry_class, pg_I || pg_I2: "rot_axis 2  0 0 1",
    #   "rot_axis 5  0.525731114  0 0.850650807", "rot_axis 3  0 0.356822076 0.934172364"
    G = symmetry_matrices("I2")
    for d in ([1, -1, -1], [-1, 1, -1], [-1, -1, 1]):
        assert contains(G, np.diag(np.array(d, dtype=float)))
    assert has_axis(G, 5, (0.525731114, 0.0, 0.850650807))  # 5-fold in the xz plane, = (1, 0, PHI)
    assert has_axis(G, 5, (1.0, 0.0, PHI), tol=1e-12)
    assert has_axis(G, 3, (0.0, 0.356822076, 0.934172364))
    assert not has_axis(G, 5, (0.0, 1.0, PHI))  # ... and not in the yz plane
    # elements, not axes: 6 five-fold axes x 2 (72 deg), 10 three-fold axes x 2, 15 two-fold axes
    assert len(fold_axes(G, 5)) == 12 and len(fold_axes(G, 3)) == 20 and len(fold_axes(G, 2)) == 15
    assert same_set(G, symmetry_matrices("I"))


def test_i1_no_crowther_222():
    # fill_symmetry_class, pg_I1: "rot_axis 2  1 0 0",
    #   "rot_axis 5 0.85065080702670 0 -0.5257311142635", "rot_axis 3 0.9341723640 0.3568220765 0"
    G = symmetry_matrices("I1")
    for d in ([1, -1, -1], [-1, 1, -1], [-1, -1, 1]):
        assert contains(G, np.diag(np.array(d, dtype=float)))
    assert has_axis(G, 5, (0.85065080702670, 0.0, -0.5257311142635))
    assert has_axis(G, 3, (0.9341723640, 0.3568220765, 0.0))
    assert has_axis(G, 5, (0.0, 1.0, PHI), tol=1e-12)  # 5-folds nearest +z in the yz plane
    assert not has_axis(G, 5, (1.0, 0.0, PHI))


def test_i1_is_i2_turned_90_about_z():
    I1, I2 = symmetry_matrices("I1"), symmetry_matrices("I2")
    assert not same_set(I1, I2)
    R = rz(90)
    assert same_set(np.einsum("ij,njk,lk->nil", R, I1, R), I2)


def test_i3_i4_relion_axes():
    # fill_symmetry_class, pg_I3: "rot_axis 2  -0.5257311143 0 0.8506508070", "rot_axis 5  0. 0. 1.",
    #   "rot_axis 3  -0.4911234778630044, 0.3568220764705179, 0.7946544753759428"
    G3 = symmetry_matrices("I3")
    assert has_axis(G3, 2, (-0.5257311143, 0.0, 0.8506508070))
    assert has_axis(G3, 5, (0.0, 0.0, 1.0))
    assert has_axis(G3, 3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))
    # pg_I4: "rot_axis 2  0.5257311143 0 0.8506508070", "rot_axis 5  0.8944271932547096 0 0.4472135909903704",
    #   "rot_axis 3  0.4911234778630044 0.3568220764705179 0.7946544753759428"
    G4 = symmetry_matrices("I4")
    assert has_axis(G4, 2, (0.5257311143, 0.0, 0.8506508070))
    assert has_axis(G4, 5, (0.8944271932547096, 0.0, 0.4472135909903704))
    assert has_axis(G4, 3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))
    assert has_axis(G4, 5, (0.0, 0.0, 1.0))
    assert not same_set(G3, G4)
    R = rz(36)
    assert same_set(np.einsum("ij,njk,lk->nil", R, G3, R), G4)


def test_rotation_about_axis_right_handed():
    assert np.allclose(rotation_about_axis([0, 0, 1], 4) @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])


@pytest.mark.parametrize("bad", ["X", "C", "D", "C0", "D1", "I5", "I0", "Ih", "C2v", "D2h", "Oh", "T2", "", "CC3", "-C3"])
def test_unknown_names_raise(bad):
    with pytest.raises(ValueError):
        symmetry_matrices(bad)
    with pytest.raises(ValueError):
        symmetry_order(bad)


def test_unknown_message():
    with pytest.raises(ValueError, match=r"unknown symmetry group 'X' \(expected C<n>, D<n>, T, O, I, I1-I4\)"):
        symmetry_matrices("X")
