"""Writing RELION particle STAR files: ``starfile.write`` with ``float_format=None`` so pandas writes every float
with ``repr`` (shortest string that round-trips exactly). starfile's own default, ``'%.6f'``, would silently lose
precision (1e-7 -> 0.000000). Image names are rebased for the output folder."""
from __future__ import annotations

import os

import numpy as np

from .atomic import atomic_path
from .star_read import ParticleStar


def rebase_image_names(star: ParticleStar, out_dir) -> pd.DataFrame:
    """A copy of ``star``'s particle table for a STAR file written in ``out_dir``: image names whose stack was
    found relative to the input STAR's folder are rewritten relative to ``out_dir`` (same file, from the new
    folder); absolute names and names that resolved from the working directory (RELION's project-relative
    convention) are kept. The input table is not modified. One decision per stack file, not per particle: each
    stack token resolved to one path in :func:`read_particles` (``star.stack``)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    particles = star.particles.copy()
    parts = particles["rlnImageName"].astype(str).str.partition("@")
    tokens = parts[2].to_numpy(dtype=str)
    uniq, first = np.unique(tokens, return_index=True)
    new = {}
    for rel, path in zip(uniq, star.stack[first]):
        kept = os.path.isabs(rel.strip()) or os.path.normpath(os.path.abspath(rel.strip())) == path
        new[rel] = rel if kept else os.path.relpath(path, out_dir)
    particles["rlnImageName"] = parts[0] + "@" + parts[2].map(new)
    return particles


def particles_table(optics_rows: list[dict], particle_columns: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build (optics_df, particles_df) from a list of optics-group dicts and a
    dict of equal-length particle columns (lists / numpy arrays)."""
    import pandas as pd
    optics = pd.DataFrame(list(optics_rows))
    lengths = {k: len(v) for k, v in particle_columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"particle columns have different lengths: {lengths}")
    particles = pd.DataFrame({k: np.asarray(v) for k, v in particle_columns.items()})
    return optics, particles


def write_particles(path, star, updates: dict | None = None, workers: int | None = None) -> None:
    """Write optics + particles blocks atomically.

    ``star`` is a ParticleStar or an (optics_df, particles_df) tuple (optics_df
    may be None: a single ``data_particles`` block). ``updates`` maps column
    names to length-N arrays that are added or replace existing columns.
    Floats are written with repr precision, so a read->write->read round trip
    preserves every value exactly.

    A large table is formatted by several processes at once (``workers``; default :func:`format_workers`), each
    formatting a range of rows with ``starfile.write``; the file is the same text as one process writes.
    """
    import starfile
    path = os.fspath(path)
    if isinstance(star, ParticleStar):
        optics, particles = star.optics, star.particles
    else:
        optics, particles = star
    particles = particles.copy()
    # Origins updated in Å supersede RELION 3.0's pixel origins: a stale rlnOriginX/Y left beside them would be
    # read by RELION in their place (its 3.0 -> 3.1 conversion, StarConverter::translateOffsets in
    # src/star_converter.cpp, writes rlnOriginXAngst = rlnOriginX x pixel size over any existing value).
    for axis in ("X", "Y", "Z"):
        if f"rlnOrigin{axis}Angst" in (updates or {}) and f"rlnOrigin{axis}" in particles.columns:
            particles = particles.drop(columns=[f"rlnOrigin{axis}"])
    for col, values in (updates or {}).items():
        values = np.asarray(values)
        if values.ndim != 1 or len(values) != len(particles):
            raise ValueError(f"update column {col} has shape {values.shape}, expected ({len(particles)},)")
        particles[col] = values
    blocks = {}
    if optics is not None:
        blocks["optics"] = optics
    blocks["particles"] = particles
    n_parts = format_workers(len(particles), workers)
    with atomic_path(path) as tmp:
        if n_parts <= 1:
            starfile.write(blocks, tmp, float_format=None)
        else:
            _write_in_parts(blocks, tmp, n_parts)


#: the rows a formatting process takes at least (below, one process formats the whole table: the forks and the
#: joining would cost more than they save)
ROWS_PER_WORKER = 100_000
#: at most this many formatting processes
MAX_WORKERS = 8

_PARTS: dict = {}  # the blocks being written in parts: inherited by the forked formatting processes


def format_workers(n_rows: int, workers: int | None = None) -> int:
    """How many processes format a particles table of ``n_rows`` rows: ``workers`` if given, else one per
    :data:`ROWS_PER_WORKER` rows, at most :data:`MAX_WORKERS` and the cores this process may use (its
    affinity: an MPI rank bound to one core formats alone); 1 where the platform cannot fork."""
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        return 1
    if workers is not None:
        return max(1, min(int(workers), n_rows))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores, n_rows // ROWS_PER_WORKER))


def _format_part(i: int, path: str) -> int:
    """Formatting process: rows ``_PARTS["edges"][i]:[i + 1]`` of the particles block into ``path`` with
    ``starfile.write`` (the first part with every block, the others with the particles block alone)."""
    import starfile

    blocks, edges = _PARTS["blocks"], _PARTS["edges"]
    rows = blocks["particles"].iloc[edges[i]:edges[i + 1]]
    starfile.write(dict(blocks, particles=rows) if i == 0 else {"particles": rows}, path, float_format=None)
    return i


def _rows_of(path: str, columns: list) -> list[str]:
    """The data rows of a particles block alone as ``starfile.write`` lays it out: a comment, two blank lines,
    ``data_particles``, a blank line, ``loop_``, one ``_name #k`` line per column, the rows, two blank lines."""
    with open(path) as f:
        lines = f.read().split("\n")
    head = 6 + len(columns)
    if lines[3] != "data_particles" or lines[5] != "loop_" or lines[head - 1] != f"_{columns[-1]} #{len(columns)}":
        raise RuntimeError(f"unexpected layout of starfile's output in {path}")
    body = lines[head:]
    while body and body[-1] == "":
        body.pop()
    return body


def _run_forked(fn, calls: list) -> None:
    """``fn(*args)`` for every ``args`` of ``calls``, each in a process forked from this one, all at once; raises
    RuntimeError with the first failing call's exception text. Plain ``os.fork``: the EM jobs write their particles
    in a forked writer process that multiprocessing makes a daemon, and a daemon may not start multiprocessing's
    children. A child leaves with ``os._exit`` (no atexit handler, such as MPI's finalize, is called there)."""
    children = []
    for args in calls:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(r)
            code = 1
            try:
                fn(*args)
                code = 0
            except BaseException as e:  # noqa: BLE001 - sent to the parent
                os.write(w, f"{type(e).__name__}: {e}".encode(errors="replace")[:4000])
            finally:
                os._exit(code)
        os.close(w)
        children.append((pid, r))
    errors = []
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            message = f.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if status != 0:
            errors.append(message or f"a formatting process ended with status {status}")
    if errors:
        raise RuntimeError(errors[0])


def _write_in_parts(blocks: dict, tmp: str, n_parts: int) -> None:
    """``starfile.write(blocks, tmp)`` for a large particles block, its rows formatted by ``n_parts`` forked
    processes into part files next to ``tmp`` and joined in order: part 0 holds every block's header (and the
    optics block), the later parts only their rows."""
    n = len(blocks["particles"])
    edges = np.linspace(0, n, n_parts + 1).round().astype(np.int64)
    paths = [f"{tmp}.part{i}" for i in range(n_parts)]
    _PARTS.update(blocks=blocks, edges=edges)
    try:
        _run_forked(_format_part, list(enumerate(paths)))
        columns = list(blocks["particles"].columns)
        with open(paths[0]) as f:
            first = f.read().rstrip("\n")
        with open(tmp, "w") as out:
            out.write(first + "\n")
            for p in paths[1:]:
                rows = _rows_of(p, columns)
                if rows:
                    out.write("\n".join(rows) + "\n")
            out.write("\n\n")
    finally:
        _PARTS.clear()
        for p in paths:
            try:
                os.remove(p)
            except OSError:
                pass
