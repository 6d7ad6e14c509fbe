"""`mpi-em postprocess`: mask-corrected FSC, B-factor, sharpened and FSC-weighted map (RELION's
`relion_postprocess`; the steps are in :mod:`mpi_em.postprocess`).

Outputs in ``--o DIR``: postprocess.mrc (sharpened, FSC-weighted, low-passed average of the half maps),
postprocess_masked.mrc (the same times the mask), postprocess.star (tables ``general``, ``fsc`` and ``guinier``
with RELION's labels), postprocess_fsc.png (unmasked, masked, phase-randomised and corrected FSC),
postprocess_guinier.png, run.json, run.log.

Under ``mpirun -n P`` (P > 1) the maps are never whole on one rank: each rank reads its y rows of the half maps
and of the mask (memory-mapped), the FFTs are distributed (:class:`mpi_em.postprocess.Slabs`: kz planes in
Fourier space, the reconstruction's stride layout), shell sums are allreduced, and the two maps are written by
rows into one file (created by rank 0, renamed when complete); rank 0 writes the STAR, plots and run.json. The
results are those of one rank (the phase randomisation is seeded per kz plane), to float64 rounding.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import mrcfile
import numpy as np

from ..distributed import collective_step, root_step
from ..errors import InputError, OutputError
from ..io import atomic_path, check_writable_dir, read_map, write_map

log = logging.getLogger("mpi_em")


def add_arguments(p) -> None:
    p.add_argument("--half1", required=True, metavar="MRC", help="first unfiltered half map")
    p.add_argument("--half2", required=True, metavar="MRC", help="second unfiltered half map")
    p.add_argument("--mask", metavar="MRC",
                   help="solvent mask, values in [0, 1] (mpi-em mask); without it only the unmasked FSC is used")
    p.add_argument("--o", dest="output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--angpix", type=float, default=0.0, metavar="A",
                   help="voxel size in Å (default: the half maps' header)")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--auto-bfac", action="store_true",
                   help="B-factor from a straight-line fit of the FSC-weighted Guinier plot (Rosenthal and "
                        "Henderson 2003), as RELION's --auto_bfac")
    b.add_argument("--adhoc-bfac", type=float, default=0.0, metavar="B",
                   help="sharpen with this B-factor in Å^2 (negative sharpens), e.g. -200 (default: no B-factor "
                        "unless --auto-bfac)")
    p.add_argument("--autob-lowres", type=float, default=10.0, metavar="A",
                   help="lowest resolution in the B-factor fit, Å (default 10)")
    p.add_argument("--autob-highres", type=float, default=0.0, metavar="A",
                   help="highest resolution in the B-factor fit, Å (default 0: the final resolution; negative: "
                        "every shell the FSC weighting keeps, up to where the corrected FSC first reaches 0, which "
                        "is what relion_postprocess 3.1 does with its default 0)")
    p.add_argument("--mtf", metavar="STAR", help="detector MTF (rlnResolutionInversePixel, rlnMtfValue); the map is "
                                                 "divided by it before weighting")
    p.add_argument("--mtf-angpix", type=float, default=0.0, metavar="A",
                   help="pixel size of the micrographs the MTF refers to (default: --angpix)")
    p.add_argument("--low-pass", type=float, default=None, metavar="A",
                   help="low-pass the final map at this resolution in Å (default: the final resolution; 0: none)")
    p.add_argument("--skip-fsc-weighting", action="store_true", help="no sqrt(2 FSC / (1 + FSC)) weighting")
    p.add_argument("--randomize-at-fsc", type=float, default=0.8,
                   help="randomise phases from the first shell where the unmasked FSC falls below this (default 0.8)")
    p.add_argument("--randomize-at-A", type=float, default=0.0, metavar="A",
                   help="randomise phases from this resolution instead, Å (default 0: use --randomize-at-fsc)")
    p.add_argument("--force-mask", action="store_true",
                   help="use the mask even when the corrected FSC is worse than the unmasked one")
    p.add_argument("--seed", type=int, default=0, help="seed of the phase randomisation (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in the --o folder (without it a folder that holds another "
                        "job's results is refused)")


def _read_mtf(path, n, apix, mtf_apix, radius=None):
    import starfile

    from ..postprocess import mtf_curve

    if not os.path.isfile(path):
        raise InputError(path, "file not found")
    try:
        data = starfile.read(path, always_dict=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(path, f"not a readable STAR file: {e}") from e
    tables = [t for t in data.values() if hasattr(t, "columns")]
    for field in ("rlnResolutionInversePixel", "rlnMtfValue"):
        if not tables or field not in tables[0].columns:
            raise InputError(path, "column missing", field=field)
    t = tables[0]
    freq = np.asarray(t["rlnResolutionInversePixel"], dtype=np.float64)
    val = np.asarray(t["rlnMtfValue"], dtype=np.float64)
    if len(freq) < 2 or np.any(np.diff(freq) <= 0):
        raise InputError(path, "resolutions must increase, at least two rows", field="rlnResolutionInversePixel")
    if np.any(val < 1e-10) or not np.isfinite(val).all():
        raise InputError(path, "zero, negative or non-finite MTF values", field="rlnMtfValue")
    return mtf_curve(freq, val, mtf_apix, n, apix, radius=radius)


def _check_halves(args, s1, a1, s2, a2) -> float:
    """The half maps' shapes (s1, s2) and header voxel sizes (a1, a2): the same even cube; -> the voxel size
    (--angpix where given), else a one-line error naming the file and field."""
    s1, s2 = tuple(s1), tuple(s2)
    if s1 != s2:
        raise InputError(args.half2, f"shape {s2} differs from {args.half1}'s {s1}", field="nx/ny/nz")
    if len(set(s1)) != 1 or s1[0] % 2:
        raise InputError(args.half1, f"expected an even cubic map, got shape {s1}", field="nx/ny/nz")
    if args.angpix > 0:
        return args.angpix
    if a1 <= 0:
        raise InputError(args.half1, "voxel size is 0 in the header; give --angpix", field="voxel_size")
    if a2 > 0 and abs(a2 - a1) > 1e-3 * a1:
        raise InputError(args.half2, f"voxel size {a2} Å differs from {args.half1}'s {a1} Å", field="voxel_size")
    return a1


def _load(args):
    h1, a1 = read_map(args.half1)
    h2, a2 = read_map(args.half2)
    apix = _check_halves(args, h1.shape, a1, h2.shape, a2)
    mask = None
    if args.mask:
        mask, _ = read_map(args.mask)
        if mask.shape != h1.shape:
            raise InputError(args.mask, f"shape {mask.shape} differs from the half maps' {h1.shape}", field="nx/ny/nz")
        lo, hi = float(mask.min()), float(mask.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise InputError(args.mask, f"mask values must lie in [0, 1], found {lo:.4g} to {hi:.4g}", field="data")
        if hi <= 0:
            raise InputError(args.mask, "the mask is empty (all zero)", field="data")
    return h1, h2, mask, apix


def _write_star(path, r, args, apix):
    import pandas as pd
    import starfile

    n = r.box
    i = np.arange(len(r.fsc_true))
    ang = np.where(i > 0, n * apix / np.maximum(i, 1), 999.0)
    general = {"rlnFinalResolution": r.resolution, "rlnBfactorUsedForSharpening": r.bfactor,
               "rlnUnfilteredMapHalf1": args.half1, "rlnUnfilteredMapHalf2": args.half2}
    fsc = {"rlnSpectralIndex": i, "rlnResolution": 1.0 / ang, "rlnAngstromResolution": ang}
    if r.fsc_masked is not None:
        general.update({"rlnMaskName": args.mask, "rlnRandomiseFrom": n * apix / r.randomize_at})
        fsc.update({"rlnFourierShellCorrelationCorrected": r.fsc_true,
                    "rlnFourierShellCorrelationUnmaskedMaps": r.fsc_unmasked,
                    "rlnFourierShellCorrelationMaskedMaps": r.fsc_masked,
                    "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": r.fsc_random})
    else:
        fsc["rlnFourierShellCorrelationUnmaskedMaps"] = r.fsc_true
    if r.fit:
        general.update({"rlnFittedSlopeGuinierPlot": r.fit["slope"],
                        "rlnFittedInterceptGuinierPlot": r.fit["intercept"],
                        "rlnCorrelationFitGuinierPlot": r.fit["correlation"]})
    g = r.guinier
    names = {"resolution_squared": "rlnResolutionSquared", "ln_amplitude_in": "rlnLogAmplitudesOriginal",
             "ln_amplitude_invmtf": "rlnLogAmplitudesMTFCorrected", "ln_amplitude_weighted": "rlnLogAmplitudesWeighted",
             "ln_amplitude_sharpened": "rlnLogAmplitudesSharpened"}
    guinier = {names[k]: g[k] for k in names if k in g}
    if r.fit:
        guinier["rlnLogAmplitudesIntercept"] = np.full(len(g["resolution_squared"]), r.fit["intercept"])
    with atomic_path(path) as tmp:
        starfile.write({"general": pd.DataFrame([general]), "fsc": pd.DataFrame(fsc),
                        "guinier": pd.DataFrame(guinier)}, tmp, float_format=None)


def _options(args, n, apix):
    if args.low_pass is not None and 0 < args.low_pass < 2 * apix:
        raise InputError("--low-pass", f"{args.low_pass} Å is beyond Nyquist ({2 * apix:g} Å)")


def _compute(args, h1, h2, mask, apix, mtf, layout=None):
    """fsc_curves + sharpen (collective with a distributed ``layout``); the same errors on every rank."""
    from .. import postprocess as pp

    try:
        r = pp.fsc_curves(h1, h2, mask, apix, randomize_fsc_at=args.randomize_at_fsc,
                          randomize_at_A=args.randomize_at_A or None, seed=args.seed, force_mask=args.force_mask,
                          layout=layout)
    except ValueError as e:
        raise InputError(args.half1, f"{e} (give --randomize-at-A)", field="data") from e
    pp.sharpen(r, h1, h2, auto_bfac=args.auto_bfac, adhoc_bfac=args.adhoc_bfac, fit_lowres=args.autob_lowres,
               fit_highres=args.autob_highres, fsc_weighting=not args.skip_fsc_weighting, low_pass=args.low_pass,
               mtf=mtf, layout=layout)
    if args.auto_bfac and not np.isfinite(r.bfactor):
        hi = {0.0: f"the final resolution ({r.resolution:.2f} Å)"}.get(args.autob_highres, f"{args.autob_highres:g} Å")
        raise InputError("--autob-lowres", f"fewer than two shells from {args.autob_lowres:g} Å to {hi}: give a "
                                           f"lower resolution (e.g. --autob-lowres 20) or --adhoc-bfac")
    return r


def postprocess(args) -> dict:
    t0 = time.time()
    out = check_writable_dir(args.output)
    h1, h2, mask, apix = _load(args)
    n = h1.shape[0]
    mtf = None
    if args.mtf:
        mtf = _read_mtf(args.mtf, n, apix, args.mtf_angpix if args.mtf_angpix > 0 else apix)
    _options(args, n, apix)
    r = _compute(args, h1, h2, mask, apix, mtf)
    for w in r.warnings:
        log.warning("warning: %s", w)
    write_map(os.path.join(out, "postprocess.mrc"), r.map, apix)
    if mask is not None:
        write_map(os.path.join(out, "postprocess_masked.mrc"), r.map * mask, apix)
    return _write_results(args, out, r, n, apix, t0)


def _write_results(args, out, r, n, apix, t0, ranks: int = 1) -> dict:
    """Rank 0: postprocess.star, the two plots, run.json and the summary line."""
    from ..plots import fsc_png, guinier_png

    _write_star(os.path.join(out, "postprocess.star"), r, args, apix)
    freqs = np.arange(n // 2 + 1) / (n * apix)
    curves = {"corrected": r.fsc_true, "unmasked": r.fsc_unmasked}
    if r.fsc_masked is not None:
        curves.update({"masked": r.fsc_masked, "phase-randomised, masked": r.fsc_random})
    fsc_png(os.path.join(out, "postprocess_fsc.png"), freqs, curves,
            title=f"final resolution {r.resolution:.2f} Å", threshold=0.143)
    g = r.guinier
    gcurves = {"original": g["ln_amplitude_in"]}
    for key, label in (("ln_amplitude_invmtf", "MTF-corrected"), ("ln_amplitude_weighted", "FSC-weighted"),
                       ("ln_amplitude_sharpened", "sharpened")):
        if key in g:
            gcurves[label] = g[key]
    fit = None
    if r.fit:
        xs = g["resolution_squared"][g["fit_weight"] > 0]
        fit = (r.fit["slope"], r.fit["intercept"], xs.min(), xs.max())
    guinier_png(os.path.join(out, "postprocess_guinier.png"), g["resolution_squared"], gcurves, fit=fit,
                title=f"B-factor {r.bfactor:.1f} Å$^2$")
    summary = {"half1": args.half1, "half2": args.half2, "mask": args.mask, "box": n, "pixel_size": apix,
               "final_resolution": r.resolution, "final_resolution_shell": r.resolution_shell,
               "mask_used": r.mask_used, "randomize_at_shell": r.randomize_at,
               "randomize_from_A": (n * apix / r.randomize_at) if r.randomize_at > 0 else None,
               "bfactor": r.bfactor, "bfactor_fit": r.fit or None, "low_pass": r.low_pass,
               "fsc_weighting": not args.skip_fsc_weighting, "mtf": args.mtf, "seed": args.seed,
               "warnings": r.warnings, "ranks": ranks, "seconds_total": time.time() - t0}
    with atomic_path(os.path.join(out, "run.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
    fit_text = (f" (Guinier fit {r.fit['lowres']:.2f}-{r.fit['highres']:.2f} Å, {r.fit['n_shells']} shells)"
                if r.fit else (" (ad hoc)" if args.adhoc_bfac else ""))
    log.info("final resolution %.2f Å (%s FSC 0.143), B-factor %.1f Å^2%s; outputs in %s", r.resolution,
             "corrected" if r.mask_used else "unmasked", r.bfactor, fit_text, out)
    return summary


def _headers(args):
    """Rank 0, distributed runs: (box, voxel size) from the headers, checked as :func:`_load` checks the maps."""
    def header(path):
        with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
            h = m.header
            return (int(h.nz), int(h.ny), int(h.nx)), float(m.voxel_size.x)

    for path in (args.half1, args.half2, args.mask):
        if path and not os.path.isfile(path):
            raise InputError(path, "file not found")
    (s1, a1), (s2, a2) = header(args.half1), header(args.half2)
    apix = _check_halves(args, s1, a1, s2, a2)
    if args.mask:
        sm = header(args.mask)[0]
        if sm != s1:
            raise InputError(args.mask, f"shape {sm} differs from the half maps' {s1}", field="nx/ny/nz")
    _options(args, s1[0], apix)
    return s1[0], apix


def _read_rows(path, rows) -> np.ndarray:
    """This rank's y rows (n, len(rows), n) of a map, float64, read memory-mapped."""
    from ..io.mrc import _open_mmap

    mrc = _open_mmap(os.fspath(path))
    try:
        if mrc.data is None or mrc.data.ndim != 3:
            raise InputError(path, "expected a 3D map", field="nz")
        a = np.array(mrc.data[:, rows, :], dtype=np.float64)
    finally:
        mrc.close()
    if not np.isfinite(a).all():
        raise InputError(path, "NaN or infinite voxel values", field="data")
    return a


def _write_rows(comm, path, rows, local, n, apix) -> None:
    """Collective: a float32 n^3 MRC written by rows, each rank its own, under a temporary name that rank 0
    renames once every rank has written (header statistics from allreduced sums)."""
    from mpi4py import MPI

    from ..io.atomic import _temp_name

    local = np.asarray(local, dtype=np.float32)
    stats = np.array([local.min(initial=np.inf), -local.max(initial=-np.inf)], dtype=np.float64)
    sums = np.array([local.sum(dtype=np.float64), (local.astype(np.float64) ** 2).sum()])
    comm.Allreduce(MPI.IN_PLACE, stats, op=MPI.MIN)
    comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)

    def create():
        tmp = _temp_name(path)
        try:
            with mrcfile.new_mmap(tmp, shape=(n, n, n), mrc_mode=2, overwrite=True) as m:
                m.set_volume()
                m.voxel_size = float(apix)
        except OSError as e:
            raise OutputError(path, f"cannot write: {e.strerror or e}") from e
        return tmp

    tmp = root_step(comm, create)

    def fill():
        try:
            with mrcfile.mmap(tmp, mode="r+") as m:
                m.data[:, rows, :] = local
                m.flush()
        except OSError as e:
            raise OutputError(path, f"cannot write: {e.strerror or e}") from e

    try:
        collective_step(comm, fill)
    except BaseException:
        if comm.rank == 0:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise

    def finish():
        try:
            with mrcfile.mmap(tmp, mode="r+") as m:
                mean = sums[0] / n ** 3
                m.header.dmin, m.header.dmax, m.header.dmean = stats[0], -stats[1], mean
                m.header.rms = np.sqrt(max(sums[1] / n ** 3 - mean * mean, 0.0))
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise OutputError(path, f"cannot write: {e.strerror or e}") from e

    root_step(comm, finish)


def postprocess_distributed(args, comm) -> dict:
    """``mpi-em postprocess`` over the ranks of ``comm`` (collective): no rank holds a whole map."""
    from ..postprocess import Slabs

    t0 = time.time()
    out = root_step(comm, check_writable_dir, args.output)
    n, apix = root_step(comm, _headers, args)
    L = Slabs(comm, n)

    def read():
        h1, h2 = _read_rows(args.half1, L.rows), _read_rows(args.half2, L.rows)
        mask = _read_rows(args.mask, L.rows) if args.mask else None
        mtf = None
        if args.mtf:
            mtf = _read_mtf(args.mtf, n, apix, args.mtf_angpix if args.mtf_angpix > 0 else apix, radius=L.radius)
        return h1, h2, mask, mtf

    h1, h2, mask, mtf = collective_step(comm, read)
    if mask is not None:
        from mpi4py import MPI

        lohi = np.array([mask.min(initial=np.inf), -mask.max(initial=-np.inf)])
        comm.Allreduce(MPI.IN_PLACE, lohi, op=MPI.MIN)
        lo, hi = float(lohi[0]), float(-lohi[1])

        def check():
            if lo < -1e-6 or hi > 1 + 1e-6:
                raise InputError(args.mask, f"mask values must lie in [0, 1], found {lo:.4g} to {hi:.4g}",
                                 field="data")
            if hi <= 0:
                raise InputError(args.mask, "the mask is empty (all zero)", field="data")

        root_step(comm, check)
    r = _compute(args, h1, h2, mask, apix, mtf, layout=L)
    if comm.rank == 0:
        for w in r.warnings:
            log.warning("warning: %s", w)
    _write_rows(comm, os.path.join(out, "postprocess.mrc"), L.rows, r.map, n, apix)
    if mask is not None:
        _write_rows(comm, os.path.join(out, "postprocess_masked.mrc"), L.rows, r.map * mask, n, apix)
    r.map = None
    return root_step(comm, _write_results, args, out, r, n, apix, t0, comm.size)


def run(args, comm) -> dict:
    if comm.size > 1:
        return postprocess_distributed(args, comm)
    return root_step(comm, postprocess, args)
