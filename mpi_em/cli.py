"""`mpi-em`: the command line. Run under `mpirun -n P mpi-em ...` / `srun mpi-em ...`, or alone (1 rank).

Errors: bad input ends the job on every rank with one line naming the file and the field, exit status 2
(3 for unwritable outputs, 1 otherwise). An unexpected failure on one rank aborts the whole MPI job.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from . import __version__
from .errors import MpiEmError

log = logging.getLogger("mpi_em")


def _setup_logging(rank: int, quiet: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if (rank != 0 or quiet) else logging.INFO)
    log.propagate = False


class _RunLog(logging.FileHandler):
    """run.log: a log file that, when it cannot be written (full disk), says so once on stderr and stops, instead
    of printing a '--- Logging error ---' traceback for every later line."""

    failed = False

    def handleError(self, record) -> None:  # noqa: N802 - logging's name
        if self.failed:
            return
        self.failed = True
        err = sys.exc_info()[1]
        sys.stderr.write(f"mpi-em: warning: cannot write {self.baseFilename} "
                         f"({getattr(err, 'strerror', None) or err}); logging to stderr only\n")

    def emit(self, record) -> None:
        if not self.failed:
            super().emit(record)


def _add_log_file(path: str) -> None:
    fh = _RunLog(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(fh)


def _error_to_run_log(lines) -> None:
    """The final error into run.log (where it can still be written); stderr gets it anyway."""
    for h in log.handlers:
        if isinstance(h, _RunLog) and not h.failed:
            for line in lines:
                h.emit(logging.LogRecord("mpi_em", logging.ERROR, __file__, 0, f"error: {line}", None, None))


def _others_ended_too(comm, dup, timeout: float = 5.0) -> bool:
    """After an error that was not agreed on (not RankFailed): True when every rank reaches this point within
    ``timeout`` seconds (the same error everywhere, e.g. a bad option), False when some rank is still inside
    a collective, waiting for this one (then the job must be aborted, or it would hang forever)."""
    import time

    if dup is None:
        return True
    req = dup.Ibarrier()
    t0 = time.monotonic()
    while not req.Test():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.01)
    return True


# ------------------------------------------------------------------------------------------ commands
def _simulate_args(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (particles.star, stacks/, truth.mrc)")
    p.add_argument("--box", type=int, default=64, help="box size in pixels, even (default 64)")
    p.add_argument("--n", type=int, default=5000, help="number of particles (default 5000)")
    p.add_argument("--snr", type=float, default=0.1,
                   help="signal-to-noise ratio: variance of the CTF-modulated projections over the noise "
                        "variance (default 0.1; 0 = noiseless)")
    p.add_argument("--sym", default="C1", help="symmetry of the phantom (default C1)")
    p.add_argument("--apix", type=float, default=2.5, help="pixel size in Å (default 2.5)")
    p.add_argument("--max-shift", type=float, default=2.0, help="largest origin shift in pixels (default 2)")
    p.add_argument("--defocus", type=float, nargs=2, default=(8000.0, 25000.0), metavar=("MIN", "MAX"),
                   help="defocus range in Å (default 8000 25000)")
    p.add_argument("--per-stack", type=int, default=1000, help="particles per .mrcs stack (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same data (default 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="where projections are computed (auto: the GPU when CuPy sees one)")
    p.add_argument("--domains", type=int, default=5, help="number of domains of the phantom (default 5)")
    p.add_argument("--domain-spread", type=float, default=0.3,
                   help="spread of each domain's atoms, fraction of the particle radius (default 0.3: a compact "
                        "globule; e.g. --domains 4 --domain-spread 0.12 --domain-distance 0.8 gives a lumpy "
                        "particle whose views differ clearly)")
    p.add_argument("--domain-distance", type=float, default=0.55,
                   help="largest distance of a domain centre from the particle centre, fraction of the radius "
                        "(default 0.55)")
    p.add_argument("--views", type=int, default=0, metavar="N",
                   help="draw the projection directions from N well-separated views (random in-plane angle, "
                        "shifts, CTF and noise as usual); the true view (1..N) goes into rlnClassNumber of "
                        "particles.star, the noiseless centred CTF-free views into views.mrcs (default 0: "
                        "uniformly random directions)")
    p.add_argument("--conformations", type=int, default=1, choices=[1, 2],
                   help="2: a mixture of two conformations (the second is the phantom without its largest "
                        "domain), drawn at random; truth_class001.mrc / truth_class002.mrc, and the true class in "
                        "rlnClassNumber of particles.star (default 1)")


def _simulate(args, comm) -> None:
    from .distributed import root_step
    from .io import check_writable_dir
    import numpy as np

    from .simulate import clean_projections, phantom, simulate_particles, view_poses, write_dataset

    def work():
        check_writable_dir(args.out)
        if args.box % 2 or args.box < 16:
            raise MpiEmError(f"--box must be even and >= 16, got {args.box}")
        from .backend import default_device, get_xp

        xp = get_xp(default_device() if args.device == "auto" else args.device)
        if args.views < 0:
            raise MpiEmError(f"--views must be >= 0, got {args.views}")
        if args.views and args.conformations > 1:
            raise MpiEmError("--views and --conformations 2 label rlnClassNumber differently; use one of them")
        shape = {"n_domains": args.domains, "domain_spread": args.domain_spread,
                 "domain_distance": args.domain_distance}
        vol = phantom(args.box, seed=args.seed, sym=args.sym, **shape)
        vols, poses, class_of, what = vol, None, None, ""
        if args.conformations > 1:
            vols = [vol, phantom(args.box, seed=args.seed, sym=args.sym, remove_domain=-1, **shape)]
            class_of = np.random.default_rng(args.seed + 3).integers(0, 2, args.n)
            what = f", 2 conformations ({np.bincount(class_of, minlength=2).tolist()} particles)"
        if args.views:
            rot, tilt, psi, view, vrot, vtilt, sep = view_poses(args.n, args.views, seed=args.seed + 2)
            poses = (rot, tilt, psi)
            what = f", {args.views} views at least {sep:.1f}° apart"
        sim = simulate_particles(vols, args.n, args.apix, snr=args.snr, seed=args.seed + 1,
                                 max_shift=args.max_shift, defocus_range=tuple(args.defocus), poses=poses,
                                 class_of=class_of, xp=xp)
        if args.views:
            sim.class_number = view + 1
        path = write_dataset(args.out, vols, sim, args.apix, per_stack=args.per_stack, seed=args.seed)
        if args.views:
            from .io import write_stack

            write_stack(os.path.join(args.out, "views.mrcs"), clean_projections(vol, vrot, vtilt), args.apix)
        log.info("simulated %d particles (box %d, %.2f Å/px, SNR %g, %s%s): %s", args.n, args.box, args.apix,
                 args.snr, args.sym, what, path)

    root_step(comm, work)


def _fsc_args(p) -> None:
    p.add_argument("map1", help="first map (MRC)")
    p.add_argument("map2", help="second map (MRC)")
    p.add_argument("--plot", metavar="PNG", help="write the FSC curve as a PNG")
    p.add_argument("--o", dest="output", metavar="STAR", help="write the FSC curve as a STAR table")
    p.add_argument("--threshold", type=float, default=0.143, help="FSC threshold for the resolution (default 0.143)")


def _fsc(args, comm) -> None:
    from .distributed import root_step

    def work():
        from .errors import InputError
        from .fsc import fsc, resolution_at, shell_frequencies
        from .io import read_map

        v1, a1 = read_map(args.map1)
        v2, a2 = read_map(args.map2)
        if v1.shape != v2.shape:
            raise InputError(args.map2, f"shape {v2.shape} differs from {args.map1}'s {v1.shape}", field="nx/ny/nz")
        if a1 > 0 and a2 > 0 and abs(a1 - a2) > 1e-3 * a1:
            raise InputError(args.map2, f"voxel size {a2} Å differs from {args.map1}'s {a1} Å", field="voxel_size")
        apix = a1 if a1 > 0 else 1.0
        curve = fsc(v1, v2)
        freqs = shell_frequencies(v1.shape[-1], apix)
        res = resolution_at(curve, v1.shape[-1], apix, args.threshold)
        if args.output:
            from .jobs.reconstruct import write_fsc_star

            write_fsc_star(args.output, freqs, curve)
        if args.plot:
            from .plots import fsc_png

            fsc_png(args.plot, freqs, {"FSC": curve}, title=f"{res:.2f} Å at {args.threshold}",
                    threshold=args.threshold)
        print(f"resolution at FSC {args.threshold}: {res:.3f} Å")

    root_step(comm, work)


def _reconstruct(args, comm) -> None:
    from .jobs import reconstruct

    reconstruct.run(args, comm)


def _em_job(args, comm) -> None:
    from .jobs import em

    em.run(args, comm)


def build_parser() -> argparse.ArgumentParser:
    from . import memory
    from .jobs import reconstruct

    parser = argparse.ArgumentParser(
        prog="mpi-em",
        description="MPI-distributed, multi-GPU cryo-EM reconstruction. Launch with `mpirun -n P mpi-em ...` "
                    "(one rank per GPU or CPU worker); every command also works on a single rank.")
    parser.add_argument("--version", action="version", version=f"mpi_em {__version__}")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors on the console")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("simulate", help="make a simulated data set with known truth (STAR + MRC + truth map)",
                       description="Simulate particles of a pseudo-atomic phantom: random poses and shifts, "
                                   "per-particle CTF with a defocus spread, Gaussian noise at a given SNR.")
    _simulate_args(p)
    p.set_defaults(func=_simulate)
    p = sub.add_parser("reconstruct", help="reconstruct half maps + map from known poses, with the FSC",
                       description="Distributed Fourier reconstruction from the poses in the STAR file: "
                                   "half maps (rlnRandomSubset, assigned if absent), combined map, FSC.")
    reconstruct.add_arguments(p)
    memory.add_argument(p)
    p.set_defaults(func=_reconstruct)
    from .jobs import em

    descriptions = {
        "refine3d": ("gold-standard 3D auto-refinement by expectation-maximisation",
                     "RELION-style 3D auto-refine: half sets fixed at the start, global then local searches with "
                     "automatic HEALPix refinement, tau^2 from the gold-standard FSC, convergence when resolution "
                     "and poses stop improving; half maps, combined map, FSC, particles and model STAR per "
                     "iteration (run_itNNN_*). The final files (run_*) are copies of the iteration with the best "
                     "gold-standard resolution: the last one, or an earlier one that the last did not improve on."),
        "class3d": ("3D classification by expectation-maximisation",
                    "K 3D references from the low-passed initial map (first iteration on random subsets), class "
                    "assignment with global or local orientation searches; per-class maps and sizes."),
        "class2d": ("2D classification by expectation-maximisation",
                    "K 2D references from random subsets, in-plane rotation and translation search, class "
                    "averages (MRC stack + PNG montage sorted by size), class sizes and particle assignments."),
    }
    for name, (short, long) in descriptions.items():
        p = sub.add_parser(name, help=short, description=long)
        em.add_arguments(p, name)
        memory.add_argument(p)
        p.set_defaults(func=_em_job, mode=name)
    from .jobs import initial_model, mask as mask_job, postprocess as pp_job

    jobs = (  # commands whose module gives add_arguments(p) and run(args, comm)
        ("initial-model", initial_model, "ab-initio 3D model(s) from the particles alone (no reference)",
         initial_model.DESCRIPTION),
        ("mask", mask_job, "soft solvent mask from a map (threshold, extension, soft edge)",
         "A solvent mask as RELION's relion_mask_create: optional low-pass, binarisation at a threshold, extension "
         "in pixels, raised-cosine soft edge; MRC with the map's voxel size."),
        ("postprocess", pp_job, "mask-corrected FSC, B-factor, sharpened and FSC-weighted map",
         "RELION's post-processing of two half maps: unmasked, masked, phase-randomised and corrected FSC (Chen et "
         "al. 2013), final resolution, B-factor from a Guinier fit or given, FSC-weighted sharpened map low-passed "
         "at the final resolution."),
    )
    for name, module, short, long in jobs:
        p = sub.add_parser(name, help=short, description=long)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    p = sub.add_parser("fsc", help="FSC between two maps and the resolution at a threshold")
    _fsc_args(p)
    p.set_defaults(func=_fsc)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .distributed import launch_mismatch, launcher_rank, world

    comm = world()
    mismatch = launch_mismatch(comm.size)
    if mismatch:  # several tasks, each alone in its MPI job: stop before any of them writes
        if launcher_rank() == 0:
            print(f"mpi-em: error: {mismatch}", file=sys.stderr)
        return 2
    # a second communicator for the exit agreement only: its barrier never mixes with a collective of the job
    dup = comm.Dup() if comm.size > 1 else None
    _setup_logging(comm.rank, args.quiet)
    continuing = bool(getattr(args, "continue_dir", None))
    out_dir = getattr(args, "continue_dir", None) or getattr(args, "output", None) \
        if args.command in ("reconstruct", "refine3d", "class3d", "class2d", "postprocess", "initial-model") \
        else None
    try:
        if out_dir:
            from .distributed import root_step
            from .io.atomic import claim_output

            # the folder locked for the job's life; a new run refuses a folder that holds another run unless
            # --overwrite; a --continue folder must exist (never created)
            claim = root_step(comm, claim_output, out_dir, continuing=continuing,
                              overwrite=bool(getattr(args, "overwrite", False)))
            if comm.rank == 0:
                try:
                    _add_log_file(os.path.join(out_dir, "run.log"))
                except OSError as e:
                    log.warning("cannot open %s (%s): logging to stderr only", os.path.join(out_dir, "run.log"),
                                e.strerror or e)
                if claim["removed"]:
                    log.info("--overwrite: removed %d files of the previous job in %s", len(claim["removed"]),
                             claim["folder"])
        args.func(args, comm)
    except MpiEmError as e:
        from .distributed import RankFailed

        # one line per failing rank, each on one line
        lines = [" ".join(str(m).split()) for m in (e.messages if isinstance(e, RankFailed) else [e])]
        agreed = isinstance(e, RankFailed) or _others_ended_too(comm, dup)
        if comm.rank == 0 or not agreed:
            for line in lines:
                print(f"mpi-em: error: {line}" if agreed or comm.size == 1 else
                      f"mpi-em: error: rank {comm.rank}: {line}", file=sys.stderr)
            _error_to_run_log(lines)
        sys.stderr.flush()
        code = getattr(e, "exit_code", 1) or 1
        if not agreed:  # another rank waits in a collective for this one: end them all
            comm.Abort(code)
        return code
    except KeyboardInterrupt:
        comm.Abort(130)
    except Exception:  # an unexpected failure outside an agreed step: take every rank down, never hang
        traceback.print_exc()
        sys.stderr.write(f"mpi-em: error: unexpected failure on rank {comm.rank}; aborting the MPI job\n")
        sys.stderr.flush()
        if comm.size > 1:
            comm.Abort(1)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
