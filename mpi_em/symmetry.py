"""Point-group symmetry operators with RELION's names and axis placement.

The groups are built exactly as RELION builds them (src/symmetries.cpp, SymList::fill_symmetry_class
and SymList::compute_subgroup): a short list of generating rotation axes per group name, closed under
matrix multiplication. The generator axes below are those of fill_symmetry_class, written in exact
closed form (golden ratio ``PHI``) instead of RELION's 9-10 digit decimals so that the products stay
orthogonal to machine precision:

- C<n>: ``rot_axis n 0 0 1`` -- n-fold about z.
- D<n>: ``rot_axis n 0 0 1``, ``rot_axis 2 1 0 0`` -- plus a 2-fold about x.
- T: ``rot_axis 3 0. 0. 1.``, ``rot_axis 2 0. 0.816496 0.577350`` -- the 3-fold is about **z** (not
  (1,1,1)), one 2-fold lies in the yz plane at 54.74 deg from z; no 2-fold is on x, y or z.
- O: ``rot_axis 3 .5773502 .5773502 .5773502``, ``rot_axis 4 0 0 1`` -- 4-folds on x, y, z.
- I (= I2), "Crowther 222": ``rot_axis 2 0 0 1``, ``rot_axis 5 0.525731114 0 0.850650807``,
  ``rot_axis 3 0 0.356822076 0.934172364`` -- 2-folds on x, y, z; the 5-folds nearest +z, along
  (+-1, 0, PHI), lie in the **xz** plane.
- I1, "no Crowther 222" (Heymann, Chagoyen & Belnap, JSB 151 (2005) 196-207): ``rot_axis 2 1 0 0``,
  ``rot_axis 5 0.85065080702670 0 -0.5257311142635``, ``rot_axis 3 0.9341723640 0.3568220765 0`` --
  2-folds on x, y, z; the 5-folds nearest +z, along (0, +-1, PHI), lie in the **yz** plane.
  I1 is I2 rotated by 90 deg about z.
- I3, "52 setting (as used in SPIDER?)": ``rot_axis 2 -0.5257311143 0 0.8506508070``, ``rot_axis 5 0. 0. 1.``,
  ``rot_axis 3 -0.4911234778630044, 0.3568220764705179, 0.7946544753759428`` -- 5-fold on z, a 2-fold
  in the xz plane at x < 0.
- I4, "a different 52 setting": ``rot_axis 2 0.5257311143 0 0.8506508070``,
  ``rot_axis 5 0.8944271932547096 0 0.4472135909903704``,
  ``rot_axis 3 0.4911234778630044 0.3568220764705179 0.7946544753759428`` -- also a 5-fold on z
  (generated, not listed), a 2-fold in the xz plane at x > 0. I4 is I3 rotated by 36 deg about z.

Matrices act on real-space column vectors [x, y, z]. A group contains the inverse (= transpose) of
each of its elements, so the *set* of matrices does not depend on whether one reads RELION's R or R^T
(RELION stores R^T of each generator, src/symmetries.cpp read_sym_file); only the order would.
The order returned here is this module's own: identity first, then by rotation angle, then by entries.
"""
from __future__ import annotations

import functools
import re

import numpy as np

__all__ = ["symmetry_matrices", "symmetry_order", "rotation_about_axis", "canonical_symmetry_name"]

PHI = (1.0 + np.sqrt(5.0)) / 2.0  # golden ratio

_UNKNOWN = "unknown symmetry group {!r} (expected C<n>, D<n>, T, O, I, I1-I4)"
_NAME_RE = re.compile(r"^(?:([CD])(\d+)|(T)|(O)|(I)([1-4])?)$")
_MAX_ORDER = 100_000  # guard against generators that do not close (a bug, never a user error)


def rotation_about_axis(axis, fold: int) -> np.ndarray:
    """Right-handed rotation by 360/fold degrees about ``axis`` (normalised here), acting on columns."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    ang = 2.0 * np.pi / fold
    c, s = np.cos(ang), np.sin(ang)
    K = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    R = c * np.eye(3) + s * K + (1.0 - c) * np.outer(a, a)
    R[np.abs(R) < 1e-15] = 0.0  # as RELION's setSmallValuesToZero, so exact zeros stay exact
    return R


def _polar(theta_cos: float, phi_rad: float) -> np.ndarray:
    st = np.sqrt(1.0 - theta_cos * theta_cos)
    return np.array([st * np.cos(phi_rad), st * np.sin(phi_rad), theta_cos])


# cos of the angle between a 5-fold and a nearest 3-fold: (0,1,PHI).(1,1,1) / (|.| |.|)
_COS_5_3 = PHI**2 / (np.sqrt(3.0) * np.sqrt(1.0 + PHI**2))

# (fold, axis) generators, transcribed from RELION src/symmetries.cpp SymList::fill_symmetry_class
_ICOSAHEDRAL = {
    # pg_I || pg_I2: "rot_axis 2 0 0 1", "rot_axis 5 0.525731114 0 0.850650807", "rot_axis 3 0 0.356822076 0.934172364"
    "I2": [(2, (0.0, 0.0, 1.0)), (5, (1.0, 0.0, PHI)), (3, (0.0, 1.0, PHI**2))],
    # pg_I1: "rot_axis 2 1 0 0", "rot_axis 5 0.85065080702670 0 -0.5257311142635", "rot_axis 3 0.9341723640 0.3568220765 0"
    "I1": [(2, (1.0, 0.0, 0.0)), (5, (PHI, 0.0, -1.0)), (3, (PHI**2, 1.0, 0.0))],
    # pg_I3: "rot_axis 2 -0.5257311143 0 0.8506508070", "rot_axis 5 0. 0. 1.",
    #        "rot_axis 3 -0.4911234778630044, 0.3568220764705179, 0.7946544753759428"
    "I3": [(2, (-1.0, 0.0, PHI)), (5, (0.0, 0.0, 1.0)), (3, tuple(_polar(_COS_5_3, 4.0 * np.pi / 5.0)))],
    # pg_I4: "rot_axis 2 0.5257311143 0 0.8506508070", "rot_axis 5 0.8944271932547096 0 0.4472135909903704",
    #        "rot_axis 3 0.4911234778630044 0.3568220764705179 0.7946544753759428"
    "I4": [(2, (1.0, 0.0, PHI)), (5, (2.0, 0.0, 1.0)), (3, tuple(_polar(_COS_5_3, np.pi / 5.0)))],
}


def canonical_symmetry_name(name: str) -> str:
    """Upper-case canonical name ('c7' -> 'C7', 'i' -> 'I2'); ValueError for names RELION would not take."""
    if not isinstance(name, str):
        raise ValueError(_UNKNOWN.format(name))
    m = _NAME_RE.match(name.strip().upper())
    if m is None:
        raise ValueError(_UNKNOWN.format(name))
    cd, n, t, o, i, inum = m.groups()
    if cd is not None:
        order = int(n)
        if cd == "C" and order < 1:
            raise ValueError(f"symmetry group {name!r}: C<n> needs n >= 1")
        if cd == "D" and order < 2:
            raise ValueError(f"symmetry group {name!r}: D<n> needs n >= 2")
        return f"{cd}{order}"
    if t:
        return "T"
    if o:
        return "O"
    return "I" + (inum or "2")  # RELION: pg_I == pg_I2


def _generators(canon: str) -> list[tuple[int, tuple]]:
    kind = canon[0]
    if kind == "C":
        return [(int(canon[1:]), (0.0, 0.0, 1.0))]  # pg_CN: "rot_axis n 0 0 1"
    if kind == "D":
        return [(int(canon[1:]), (0.0, 0.0, 1.0)), (2, (1.0, 0.0, 0.0))]  # pg_DN: + "rot_axis 2 1 0 0"
    if canon == "T":
        # pg_T: "rot_axis 3 0. 0. 1.", "rot_axis 2 0. 0.816496 0.577350"
        return [(3, (0.0, 0.0, 1.0)), (2, (0.0, np.sqrt(2.0 / 3.0), np.sqrt(1.0 / 3.0)))]
    if canon == "O":
        # pg_O: "rot_axis 3 .5773502 .5773502 .5773502", "rot_axis 4 0 0 1"
        return [(3, (1.0, 1.0, 1.0)), (4, (0.0, 0.0, 1.0))]
    return _ICOSAHEDRAL[canon]


def _closure(gens: list[np.ndarray], tol: float = 1e-6) -> np.ndarray:
    """All products of ``gens``: breadth-first from the identity, de-duplicated to ``tol``."""
    elems = [np.eye(3)]
    stack = np.eye(3)[None]
    frontier = [np.eye(3)]
    while frontier:
        new_frontier = []
        for g in gens:
            for h in frontier:
                m = g @ h
                if np.abs(stack - m).max(axis=(1, 2)).min() < tol:
                    continue
                elems.append(m)
                stack = np.concatenate([stack, m[None]])
                new_frontier.append(m)
                if len(elems) > _MAX_ORDER:
                    raise RuntimeError("symmetry generators do not close into a finite group")
        frontier = new_frontier
    return stack


def _sort_key(m: np.ndarray):
    cos_angle = np.clip((np.trace(m) - 1.0) / 2.0, -1.0, 1.0)
    angle = round(float(np.degrees(np.arccos(cos_angle))), 6)
    entries = tuple(round(float(x), 6) + 0.0 for x in m.ravel())  # + 0.0 turns -0.0 into 0.0
    return (angle, tuple(-e for e in entries))


@functools.lru_cache(maxsize=64)
def _matrices_cached(canon: str) -> np.ndarray:
    gens = [rotation_about_axis(axis, fold) for fold, axis in _generators(canon) if fold > 1]
    group = _closure(gens) if gens else np.eye(3)[None]
    # re-orthonormalise each element (removes the few-ulp drift of long products) and clean zeros/ones
    u, _, vt = np.linalg.svd(group)
    group = u @ vt
    group[np.abs(group) < 1e-14] = 0.0
    group[np.abs(np.abs(group) - 1.0) < 1e-14] = np.sign(group[np.abs(np.abs(group) - 1.0) < 1e-14])
    order = sorted(range(len(group)), key=lambda k: _sort_key(group[k]))
    out = np.ascontiguousarray(group[order])
    out[0] = np.eye(3)  # the identity sorts first (angle 0); make it bit-exact
    out.setflags(write=False)
    return out


def symmetry_matrices(name: str) -> np.ndarray:
    """Rotation matrices (n, 3, 3), float64, of RELION point group ``name``, identity first.

    ``name``: C<n> (n >= 1), D<n> (n >= 2), T, O, I (= I2), I1, I2, I3, I4; case-insensitive.
    Matrices act on real-space column vectors [x, y, z]; axes as in RELION (see module docstring).
    Raises ValueError for any other name.
    """
    return _matrices_cached(canonical_symmetry_name(name)).copy()


def symmetry_order(name: str) -> int:
    """Number of operators (group order) of RELION point group ``name``: C<n>: n, D<n>: 2n, T: 12, O: 24, I*: 60."""
    canon = canonical_symmetry_name(name)
    if canon[0] == "C":
        return int(canon[1:])
    if canon[0] == "D":
        return 2 * int(canon[1:])
    return {"T": 12, "O": 24}.get(canon, 60)
