"""One module per `mpi-em` command (``add_arguments``, ``run``); :mod:`mpi_em.cli` registers them."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the option's name and the value in argparse's error otherwise)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def restore_options(args, saved: dict) -> None:
    """--continue: the options of the job being continued (``saved``, from its checkpoint) set on ``args``, and
    what the process derives from them before the job allocates (the GPU allocator of a job with
    --max-memory, :func:`mpi_em.backend.set_memory_limited`, which :func:`mpi_em.cli.main` set from the command
    line alone)."""
    from ..backend import set_memory_limited

    for k, v in saved.items():
        setattr(args, k, v)
    set_memory_limited(getattr(args, "max_memory", None) is not None)


def add_job_folder_arguments(p, resumes_from: str = "its last finished iteration") -> None:
    """--i, --o, --continue and --overwrite of the iterative jobs (refine3d, class3d, class2d, initial-model);
    ``resumes_from``: where --continue resumes, in its help."""
    p.add_argument("--i", dest="input", metavar="STAR", help="particles STAR file (RELION 3.1+)")
    p.add_argument("--o", dest="output", metavar="DIR", help="output folder (created)")
    p.add_argument("--continue", dest="continue_dir", metavar="DIR",
                   help=f"resume the job in DIR from {resumes_from} (other options are read from "
                        "its checkpoint; --iter may change the number of iterations; with the same seed, the same "
                        "maps as a job never stopped); refused when the particles STAR file (by its absolute "
                        "path) no longer holds the job's particles")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the job already in the --o folder (its files are removed first); without it a "
                        "folder that holds another job's results is refused")
