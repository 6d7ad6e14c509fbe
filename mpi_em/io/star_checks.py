"""Validation of STAR columns: numbers and integers with the first bad row named, positive values, and the
per-group summary that mismatch errors quote."""
from __future__ import annotations

import numpy as np

from ..errors import InputError


def _numeric(path, df: pd.DataFrame, col: str, block: str) -> np.ndarray:
    """Column ``col`` as float64; InputError naming the first bad row otherwise."""
    import pandas as pd
    raw = df[col]
    vals = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(vals)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(path, f"non-numeric, NaN or infinite value {str(raw.iloc[i])!r} "
                               f"in row {i + 1} of data_{block}", field=col)
    return vals


def _integer(path, df, col, block) -> np.ndarray:
    vals = _numeric(path, df, col, block)
    frac = vals != np.round(vals)
    if frac.any():
        i = int(np.argmax(frac))
        raise InputError(path, f"non-integer value {vals[i]!r} in row {i + 1} of data_{block}", field=col)
    return vals.astype(np.int64)


def _positive(path, vals, col):
    bad = ~(vals > 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(path, f"value {vals[i]:g} for particle {i + 1} must be positive", field=col)


def _per_group(groups, values, by_group: bool = True, unit: str = "") -> str:
    """'optics groups (group 1: 1.5 Å, group 2: 1.6 Å)', or without optics groups the first row of each value."""
    seen = {}
    if by_group:
        for g, v in zip(groups.tolist(), np.asarray(values).tolist()):
            seen.setdefault(g, v)
        return "optics groups (" + ", ".join(f"group {g}: {v:g}{unit}" for g, v in sorted(seen.items())) + ")"
    for i, v in enumerate(np.asarray(values).tolist()):
        if v not in seen:
            seen[v] = i
            if len(seen) == 4:
                break
    return "particles (" + ", ".join(f"row {i + 1}: {v:g}{unit}" for v, i in seen.items()) + ")"
