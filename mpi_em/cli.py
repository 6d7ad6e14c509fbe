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
from .errors import MpiEmError, out_of_memory_line

log = logging.getLogger("mpi_em")


def _setup_logging(rank: int, quiet: bool = False) -> None:
    """Rank 0 logs from INFO up (the console, and run.log once the job has its folder); ``quiet``: the console only
    warnings and errors, run.log all of it. Other ranks: warnings and errors."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    handler.setLevel(logging.WARNING if quiet else logging.NOTSET)
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if rank != 0 else logging.INFO)
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


def _abort(comm, code: int, grace: float = 1.0) -> None:
    """End every rank of the job with ``code``. The launcher kills the other processes as soon as the abort
    reaches it, and may drop what this rank wrote last to a pipe it had not yet read: the error line. So the
    streams are flushed and the launcher given ``grace`` seconds to forward them first."""
    import time

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    time.sleep(grace)
    comm.Abort(code)


# ------------------------------------------------------------------------------------------ commands
_REFINE3D = ("RELION-style 3D auto-refine: half sets fixed at the start, global then local searches with automatic "
             "HEALPix refinement, tau^2 from the gold-standard FSC, convergence when the resolution stops "
             "improving at the finest sampling the angular accuracy calls for (--settle-poses: and the poses have "
             "stopped changing, as RELION's); half maps, combined map, FSC, particles and model STAR per iteration "
             "(run_itNNN_*). The final files (run_*) are those of the iteration with the best gold-standard "
             "resolution (hard links, or copies): the last one, or an earlier one that the last did not improve on.")
#: every command: (name, module in mpi_em.jobs, short help, description, flags). Each module gives
#: add_arguments(p) and run(args, comm) (the EM jobs: add_arguments(p, mode), the mode in args.mode).
#: Flags: "memory": takes --max-memory (mpi_em.memory); "output": locks its output folder for the job's life.
COMMANDS = (
    ("simulate", "simulate", "make a simulated data set with known truth (STAR + MRC + truth map)",
     "Simulate particles of a pseudo-atomic phantom: random poses and shifts, per-particle CTF with a defocus "
     "spread, Gaussian noise at a given SNR.", ()),
    ("reconstruct", "reconstruct", "reconstruct half maps + map from known poses, with the FSC",
     "Distributed Fourier reconstruction from the poses in the STAR file: half maps (rlnRandomSubset, assigned if "
     "absent), combined map, FSC.", ("memory", "output")),
    ("refine3d", "em", "gold-standard 3D auto-refinement by expectation-maximisation", _REFINE3D,
     ("memory", "output")),
    ("class3d", "em", "3D classification by expectation-maximisation",
     "K 3D references from the low-passed initial map (first iteration on random subsets), class assignment with "
     "global or local orientation searches; per-class maps and sizes.", ("memory", "output")),
    ("class2d", "em", "2D classification by expectation-maximisation",
     "K 2D references from random subsets, in-plane rotation and translation search, class averages (MRC stack + "
     "PNG montage sorted by size), class sizes and particle assignments.", ("memory", "output")),
    ("initial-model", "initial_model", "ab-initio 3D model(s) from the particles alone (no reference)", None,
     ("output",)),
    ("mask", "mask", "soft solvent mask from a map (threshold, extension, soft edge)",
     "A solvent mask as RELION's relion_mask_create: optional low-pass, binarisation at a threshold, extension in "
     "pixels, raised-cosine soft edge; MRC with the map's voxel size.", ()),
    ("postprocess", "postprocess", "mask-corrected FSC, B-factor, sharpened and FSC-weighted map",
     "RELION's post-processing of two half maps: unmasked, masked, phase-randomised and corrected FSC (Chen et al. "
     "2013), final resolution, B-factor from a Guinier fit or given, FSC-weighted sharpened map low-passed at the "
     "final resolution.", ("output",)),
    ("align-symmetry", "align_symmetry", "rotate a map onto a point group's axes and symmetrise it", None, ()),
    ("fsc", "fsc", "FSC between two maps and the resolution at a threshold", None, ()),
    ("warmup", "warmup", "compile the GPU kernels ahead of the data (once per machine)", None, ()),
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from . import memory

    parser = argparse.ArgumentParser(
        prog="mpi-em",
        description="MPI-distributed, multi-GPU cryo-EM reconstruction. Launch with `mpirun -n P mpi-em ...` "
                    "(one rank per GPU or CPU worker); every command also works on a single rank.")
    parser.add_argument("--version", action="version", version=f"mpi_em {__version__}")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors on the console")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name, short, long, flags in COMMANDS:
        module = importlib.import_module(f".jobs.{module_name}", __package__)
        p = sub.add_parser(name, help=short, description=long or getattr(module, "DESCRIPTION", None))
        if module_name == "em":
            module.add_arguments(p, name)
            p.set_defaults(mode=name)
        else:
            module.add_arguments(p)
        if "memory" in flags:
            memory.add_argument(p)
        p.set_defaults(func=module.run)
    return parser


def _output_folder(args) -> str | None:
    """The folder the command locks for its life (--continue's, else --o's), None for commands without one."""
    flags = next(f for name, _, _, _, f in COMMANDS if name == args.command)
    if "output" not in flags:
        return None
    return getattr(args, "continue_dir", None) or getattr(args, "output", None)


def main(argv=None) -> int:
    from . import hostmem

    hostmem.keep_freed_memory()  # CPU ranks: freed temporaries kept for the next batch (before any array)
    parser = build_parser()
    args = parser.parse_args(argv)
    from .distributed import launch_mismatch, launcher_rank, world

    from .backend import set_memory_limited

    set_memory_limited(getattr(args, "max_memory", None) is not None)  # the GPU allocator (backend.allocator_choice)
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
    out_dir = _output_folder(args)
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
            _abort(comm, code)
        return code
    except KeyboardInterrupt:
        _abort(comm, 130)
    except Exception as e:  # an unexpected failure outside an agreed step: take every rank down, never hang
        oom = out_of_memory_line(e, out_dir)
        if oom:  # one line, no traceback: the memory check's estimate was short of what the job needed
            _error_to_run_log([oom])
            sys.stderr.write(f"mpi-em: error: rank {comm.rank}: {oom}\n")
        else:
            traceback.print_exc()
        sys.stderr.write(f"mpi-em: error: unexpected failure on rank {comm.rank}; aborting the MPI job\n")
        if comm.size > 1:
            _abort(comm, 1)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
