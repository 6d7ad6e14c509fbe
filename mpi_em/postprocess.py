"""Post-processing of two half maps, RELION's `relion_postprocess` (src/postprocessing.cpp) step by step.

1. FSC of the unmasked half maps; of the masked half maps; of the masked half maps whose phases were randomised
   from the first shell where the unmasked FSC falls below 0.8 (``randomize_at``).
2. Corrected FSC (Chen et al. 2013): FSC_true = (FSC_t - FSC_n) / (1 - FSC_n) from shell randomize_at + 2 on, the
   masked FSC below it. The final resolution is N apix / i for the last shell i before FSC_true first falls below
   0.143 (a whole shell, as RELION reports it).
3. The average of the half maps, divided by the detector MTF (optional), weighted per shell by
   sqrt(2 FSC / (1 + FSC)) up to the shell before the corrected FSC first falls below 1e-4 (zero beyond).
4. Guinier plot ln(mean |F|) against 1/d^2 of the weighted map; the B-factor is 4x the slope of a straight line
   fitted over ``fit_lowres`` >= d >= ``fit_highres``. Defaults 10 Å to the final resolution, as RELION documents
   its defaults (--autob_lowres 10, --autob_highres 0 "until the final resolution"); RELION's program with 0 in
   fact fits every shell the FSC weighting kept, up to where the corrected FSC first reaches 0, where the weights
   are noise: a negative ``fit_highres`` does that.
5. exp(-B/4 |s|^2) up to Nyquist (zero beyond), then a raised-cosine low-pass (two shells wide) at the final
   resolution.

Fourier transforms are normalised as RELION's (forward divided by N^3), so the Guinier values can be compared
with RELION's STAR file.

Distributed (:class:`Slabs`): every step works on a rank's share of the maps, in the stride layout of the
reconstruction (:func:`mpi_em.distvolume.owned_planes`): real-space y rows y = rank (mod P), Fourier kz planes
kz = rank (mod P); the 3D FFTs are done locally along two axes with one ``Alltoallv`` transpose between them,
shell sums are allreduced, and the phase randomisation draws each kz plane's phases from a generator seeded by
(seed, half, kz), so that every result is the same for any number of ranks (to float64 rounding). Whole arrays
on one process are the case P = 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .fourier import radius_3d, shell_index
from .masks import lowpass_weights


class Slabs:
    """A rank's share of an n^3 map and of its (n, n, n//2+1) rfftn: real-space y rows ``rows`` (arrays
    (n, len(rows), n)) and Fourier kz planes ``rows`` (arrays (len(rows), n, n//2+1)), rows = owned_planes(n,
    rank, P). ``comm`` None: one process with whole arrays."""

    def __init__(self, comm, n: int):
        from .distvolume import owned_planes

        self.comm, self.n = comm, int(n)
        size, rank = (comm.size, comm.rank) if comm is not None else (1, 0)
        self.plan = [owned_planes(self.n, r, size) for r in range(size)]
        self.rows = self.plan[rank]
        kz = np.fft.fftfreq(self.n, d=1.0 / self.n)[self.rows].reshape(-1, 1, 1)
        ky = np.fft.fftfreq(self.n, d=1.0 / self.n).reshape(1, -1, 1)
        kx = np.arange(self.n // 2 + 1, dtype=np.float64).reshape(1, 1, -1)
        self.radius = np.sqrt(kz * kz + ky * ky + kx * kx)   # |k| of the owned kz planes (fourier.radius_3d)

    @property
    def distributed(self) -> bool:
        return self.comm is not None and self.comm.size > 1

    def sum(self, a) -> np.ndarray:
        """Sum over ranks (float64)."""
        a = np.ascontiguousarray(a, dtype=np.float64)
        if not self.distributed:
            return a
        from mpi4py import MPI

        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=MPI.SUM)
        return out

    def _transpose(self, a, split: int, gather: int):
        """Alltoallv: the blocks of ``a`` along axis ``split`` owned by each rank go to it; the blocks received
        are placed along axis ``gather`` at the sender's rows."""
        if not self.distributed:
            return a
        from mpi4py import MPI

        from .distvolume import _displs

        plan, rank = self.plan, self.comm.rank
        blocks = [np.ascontiguousarray(np.take(a, p, axis=split)) for p in plan]
        send = np.concatenate([b.reshape(-1) for b in blocks]) if blocks else np.empty(0, a.dtype)
        shape = list(a.shape)
        shape[split] = len(plan[rank])
        rshapes = []
        for p in plan:
            sh = list(shape)
            sh[gather] = len(p)
            rshapes.append(sh)
        scounts = [b.size for b in blocks]
        rcounts = [int(np.prod(sh, dtype=np.int64)) for sh in rshapes]
        recv = np.empty(sum(rcounts), dtype=np.complex128)
        send = send.astype(np.complex128, copy=False)
        self.comm.Alltoallv([send, (scounts, _displs(scounts)), MPI.C_DOUBLE_COMPLEX],
                            [recv, (rcounts, _displs(rcounts)), MPI.C_DOUBLE_COMPLEX])
        full = list(shape)
        full[gather] = self.n
        out = np.empty(full, dtype=np.complex128)
        d = _displs(rcounts)
        for s, p in enumerate(plan):
            idx = [slice(None)] * len(full)
            idx[gather] = p
            out[tuple(idx)] = recv[d[s]:d[s] + rcounts[s]].reshape(rshapes[s])
        return out

    def rfft(self, x) -> np.ndarray:
        """numpy's rfftn of the whole map, this rank's kz planes, from this rank's y rows."""
        a = np.fft.fft(np.fft.rfft(np.asarray(x, dtype=np.float64), axis=2), axis=0)
        return np.fft.fft(self._transpose(a, 0, 1), axis=1)

    def irfft(self, F) -> np.ndarray:
        """numpy's irfftn (s = (n, n, n)) of the whole array, this rank's y rows, from this rank's kz planes."""
        a = self._transpose(np.fft.ifft(np.asarray(F, dtype=np.complex128), axis=1), 1, 0)
        return np.fft.irfft(np.fft.ifft(a, axis=0), n=self.n, axis=2)

    def fsc(self, F1, F2) -> np.ndarray:
        """:func:`mpi_em.fsc.fsc_fourier` of the whole arrays (shells rint(|k|) up to n/2)."""
        nb = self.n // 2 + 1
        shell = shell_index(self.radius).ravel()
        keep = shell < nb
        shell = shell[keep]
        sums = np.stack([np.bincount(shell, weights=w.ravel()[keep], minlength=nb)[:nb] for w in
                         ((F1 * np.conj(F2)).real, np.abs(F1) ** 2, np.abs(F2) ** 2)])
        num, d1, d2 = self.sum(sums)
        den = np.sqrt(d1 * d2)
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)

    def randomize_phases(self, x, index: int, seed: int, half: int) -> np.ndarray:
        """:func:`randomize_phases_beyond` of the whole map, the phases of kz plane z drawn from
        default_rng([seed, half, z]) (uniform in [0, 2 pi) over the whole (n, n//2+1) plane, used where |k|^2
        >= index^2): this rank's y rows."""
        F = self.rfft(x)
        sel = self.radius ** 2 >= index * index - 1e-9
        for j, z in enumerate(self.rows):
            if sel[j].any():
                phase = np.random.default_rng([int(seed), int(half), int(z)]).uniform(0.0, 2.0 * np.pi,
                                                                                       F.shape[1:])
                F[j][sel[j]] = np.abs(F[j][sel[j]]) * np.exp(1j * phase[sel[j]])
        return self.irfft(F)


def rfft_relion(vol) -> np.ndarray:
    vol = np.asarray(vol, dtype=np.float64)
    return np.fft.rfftn(vol) / vol.size


def irfft_relion(F, n: int) -> np.ndarray:
    return np.fft.irfftn(F * n ** 3, s=(n, n, n), axes=(0, 1, 2))


def randomize_phases_beyond(vol, index: int, rng) -> np.ndarray:
    """The map with the phases of every coefficient with |k|^2 >= index^2 replaced by uniform random phases,
    amplitudes kept (RELION's randomizePhasesBeyond)."""
    vol = np.asarray(vol, dtype=np.float64)
    n = vol.shape[-1]
    F = np.fft.rfftn(vol)
    sel = radius_3d(n) ** 2 >= index * index - 1e-9
    phase = rng.uniform(0.0, 2.0 * np.pi, int(sel.sum()))
    F[sel] = np.abs(F[sel]) * np.exp(1j * phase)
    return np.fft.irfftn(F, s=vol.shape, axes=(0, 1, 2))


def corrected_fsc(fsc_masked, fsc_random, randomize_at: int) -> np.ndarray:
    """Chen et al. (2013) as RELION's calculateFSCtrue: the masked FSC below shell ``randomize_at`` + 2,
    (FSC_t - FSC_n) / (1 - FSC_n) from there on."""
    fm = np.array(fsc_masked, dtype=np.float64)
    fr = np.array(fsc_random, dtype=np.float64)
    if fm[0] <= 0:  # as RELION: the FSC at the origin is sometimes -1
        fm[0] = 1.0
    if fr[0] <= 0:
        fr[0] = 1.0
    out = fm.copy()
    i = np.arange(len(fm))
    far = i >= randomize_at + 2
    with np.errstate(divide="ignore", invalid="ignore"):
        out[far] = (fm[far] - fr[far]) / (1.0 - fr[far])
    return out


def last_shell_above(curve, threshold: float) -> int:
    """The last shell i before the curve first falls below ``threshold`` (0 when shell 0 already does)."""
    below = np.flatnonzero(np.asarray(curve) < threshold)
    first = int(below[0]) if len(below) else len(curve)
    return max(first - 1, 0)


def shell_resolution(i: int, n: int, pixel_size: float) -> float:
    return float(n * pixel_size / i) if i > 0 else 999.0


def fsc_weights(curve) -> np.ndarray:
    """Per-shell weight sqrt(2 FSC / (1 + FSC)) up to the shell before FSC first falls below 1e-4, zero beyond
    (RELION's applyFscWeighting)."""
    curve = np.asarray(curve, dtype=np.float64)
    keep = np.arange(len(curve)) <= last_shell_above(curve, 1e-4)
    c = np.where(keep, np.clip(curve, 0.0, None), 0.0)
    return np.sqrt(2.0 * c / (1.0 + c))


def guinier(F, n: int, pixel_size: float, fit_lowres: float, fit_highres: float, layout: "Slabs | None" = None):
    """RELION's makeGuinierPlot over shells 0..N/2: (x = 1/d^2, y = ln mean |F| (-99 where zero), fit weight 0/1).
    ``layout``: F holds that rank's kz planes (sums over ranks)."""
    shells = shell_index(radius_3d(n) if layout is None else layout.radius).ravel()
    nb = n // 2 + 1
    keep = shells < nb
    s = shells[keep]
    amp = np.bincount(s, weights=np.abs(F).ravel()[keep], minlength=nb)
    cnt = np.bincount(s, minlength=nb).astype(np.float64)
    if layout is not None:
        amp, cnt = layout.sum(np.stack([amp, cnt]))
    i = np.arange(nb)
    with np.errstate(divide="ignore"):
        res = np.where(i > 0, n * pixel_size / np.maximum(i, 1), np.inf)
    x = np.where(i > 0, 1.0 / res ** 2, 0.0)
    ok = amp > 0
    y = np.full(nb, -99.0)
    y[ok] = np.log(amp[ok] / cnt[ok])
    w = (ok & (res <= fit_lowres) & (res >= fit_highres)).astype(np.float64)
    return x, y, w


def fit_line(x, y, w):
    """Weighted least-squares line (RELION's fitStraightLine): slope, intercept, squared correlation."""
    sw = w.sum()
    if sw < 2:
        return float("nan"), float("nan"), float("nan")
    ax, ay = (w * x).sum() / sw, (w * y).sum() / sw
    sxx = (w * x * x).sum() - sw * ax * ax
    syy = (w * y * y).sum() - sw * ay * ay
    sxy = (w * x * y).sum() - sw * ax * ay
    slope = sxy / sxx
    return float(slope), float(ay - slope * ax), float(sxy * sxy / (sxx * syy))


def mtf_curve(table_freq_inv_px, table_mtf, mtf_pixel_size: float, n: int, pixel_size: float,
              radius=None) -> np.ndarray:
    """MTF at every (n, n, n//2+1) coefficient (or at |k| = ``radius``) up to Nyquist (1 beyond), linearly
    interpolated in 1/Å from a table in 1/pixel of the detector (rlnResolutionInversePixel, rlnMtfValue), ends
    held constant."""
    res = (radius_3d(n) if radius is None else radius) / (n * pixel_size)
    m = np.interp(res, np.asarray(table_freq_inv_px, dtype=np.float64) / mtf_pixel_size,
                  np.asarray(table_mtf, dtype=np.float64))
    return np.where(res < 1.0 / (2.0 * pixel_size), m, 1.0)


@dataclass
class Result:
    box: int
    pixel_size: float
    fsc_unmasked: np.ndarray
    fsc_masked: np.ndarray | None = None
    fsc_random: np.ndarray | None = None
    fsc_true: np.ndarray | None = None
    randomize_at: int = -1
    resolution: float = 999.0
    resolution_shell: int = 0
    mask_used: bool = False
    bfactor: float = 0.0
    fit: dict = field(default_factory=dict)
    guinier: dict = field(default_factory=dict)
    low_pass: float = 0.0
    warnings: list = field(default_factory=list)
    map: np.ndarray | None = None


def fsc_curves(half1, half2, mask=None, pixel_size: float = 1.0, randomize_fsc_at: float = 0.8,
               randomize_at_A: float | None = None, seed: int = 0, force_mask: bool = False,
               layout: Slabs | None = None) -> Result:
    """Steps 1-2: the four FSC curves and the final resolution (RELION's run() up to the sharpening).

    ``layout``: the maps are this rank's y rows (:class:`Slabs`; collective); default: whole maps. The phases of
    kz plane z of half h (1, 2) are drawn from default_rng([seed, h, z])."""
    h1 = np.asarray(half1, dtype=np.float64)
    h2 = np.asarray(half2, dtype=np.float64)
    n = h1.shape[-1]
    L = Slabs(None, n) if layout is None else layout
    r = Result(box=n, pixel_size=pixel_size, fsc_unmasked=L.fsc(L.rfft(h1), L.rfft(h2)))
    if mask is None:
        r.fsc_true = r.fsc_unmasked.copy()
    else:
        m = np.asarray(mask, dtype=np.float64)
        r.fsc_masked = L.fsc(L.rfft(h1 * m), L.rfft(h2 * m))
        if randomize_at_A is not None and randomize_at_A > 0:
            r.randomize_at = int(pixel_size * n / randomize_at_A)
        else:
            below = np.flatnonzero(r.fsc_unmasked[1:] < randomize_fsc_at)
            r.randomize_at = int(below[0]) + 1 if len(below) else -1
        if r.randomize_at <= 0:
            raise ValueError(f"the unmasked FSC never falls below {randomize_fsc_at}: nothing to randomise")
        p1 = L.randomize_phases(h1, r.randomize_at, seed, 1)
        p2 = L.randomize_phases(h2, r.randomize_at, seed, 2)
        r.fsc_random = L.fsc(L.rfft(p1 * m), L.rfft(p2 * m))
        r.fsc_true = corrected_fsc(r.fsc_masked, r.fsc_random, r.randomize_at)
        r.mask_used = True
    r.resolution_shell = last_shell_above(r.fsc_true, 0.143) if r.fsc_true[0] >= 0.143 else 0
    if mask is not None:
        unmasked_i = last_shell_above(r.fsc_unmasked, 0.143) if r.fsc_unmasked[0] >= 0.143 else 0
        if unmasked_i > r.resolution_shell:
            if force_mask:
                r.warnings.append("the unmasked FSC extends beyond the solvent-corrected FSC (mask forced)")
            else:
                r.warnings.append("the unmasked FSC extends beyond the solvent-corrected FSC: the unmasked FSC is "
                                  "used (adjust the mask, or --force-mask)")
                r.fsc_true = r.fsc_unmasked.copy()
                r.resolution_shell = unmasked_i
                r.mask_used = False
        elif r.fsc_random[r.resolution_shell] > 0.1:
            r.warnings.append("the phase-randomised FSC is above 0.10 at the final resolution: a softer mask with "
                              "fewer features would give a more reliable estimate")
    r.resolution = shell_resolution(r.resolution_shell, n, pixel_size)
    return r


def sharpen(r: Result, half1, half2, auto_bfac: bool = True, adhoc_bfac: float = 0.0, fit_lowres: float = 10.0,
            fit_highres: float = 0.0, fsc_weighting: bool = True, low_pass: float | None = None, mtf=None,
            edge_width: int = 2, layout: Slabs | None = None) -> Result:
    """Steps 3-5 on the average of the half maps; fills r.map, r.bfactor, r.fit, r.guinier, r.low_pass.

    ``fit_highres``: 0 = the final resolution, negative = every shell the FSC weighting kept (RELION's program).
    ``low_pass``: None = at the final resolution; 0 = none. ``mtf``: None or the per-coefficient MTF array
    (of the layout's kz planes). ``layout``: the half maps and r.map are this rank's y rows (collective)."""
    n, apix = r.box, r.pixel_size
    L = Slabs(None, n) if layout is None else layout
    rad = L.radius
    if fit_highres == 0:
        fit_highres = r.resolution
    elif fit_highres < 0:
        fit_highres = 0.0
    avg = 0.5 * (np.asarray(half1, dtype=np.float64) + np.asarray(half2, dtype=np.float64))
    F = L.rfft(avg) / n ** 3
    x, y_in, _ = guinier(F, n, apix, fit_lowres, fit_highres, L)
    g = {"resolution_squared": x, "ln_amplitude_in": y_in}
    if mtf is not None:
        F = F / mtf
        g["ln_amplitude_invmtf"] = guinier(F, n, apix, fit_lowres, fit_highres, L)[1]
    if fsc_weighting:
        w = fsc_weights(r.fsc_true)
        shells = shell_index(rad)
        F = F * np.where(shells < len(w), w[np.minimum(shells, len(w) - 1)], 0.0)
    _, y_w, fitw = guinier(F, n, apix, fit_lowres, fit_highres, L)
    if fsc_weighting:
        g["ln_amplitude_weighted"] = y_w
    r.bfactor = 0.0
    if auto_bfac:
        slope, intercept, corr = fit_line(x, y_w, fitw)
        used = np.flatnonzero(fitw > 0)
        r.fit = {"slope": slope, "intercept": intercept, "correlation": corr, "n_shells": int(len(used)),
                 "lowres": shell_resolution(int(used[0]), n, apix) if len(used) else float("nan"),
                 "highres": shell_resolution(int(used[-1]), n, apix) if len(used) else float("nan")}
        r.bfactor = 4.0 * slope
        g["fit_weight"] = fitw
    elif adhoc_bfac:
        r.bfactor = float(adhoc_bfac)
    if r.bfactor:
        s2 = (rad / (n * apix)) ** 2
        nyq = rad / (n * apix) <= 1.0 / (2.0 * apix)
        F = F * np.where(nyq, np.exp(-(r.bfactor / 4.0) * s2), 0.0)
        g["ln_amplitude_sharpened"] = guinier(F, n, apix, fit_lowres, fit_highres, L)[1]
    r.guinier = g
    r.low_pass = r.resolution if low_pass is None else float(low_pass)
    if r.low_pass > 0:
        F = F * lowpass_weights(n, r.low_pass, apix, edge_width, radius=rad)
    r.map = (L.irfft(F) * n ** 3).astype(np.float32)
    return r
