"""mpi-em with the particle reader's read-ahead depth set by READ_DEPTH (iter_batches' depth, default 2)."""
import os
import sys

import mpi_em.particles as particles

D = int(os.environ.get("READ_DEPTH", "2"))
_orig = particles.iter_batches


def iter_batches(plan, batch_size, prefetch=True, depth=2, pinned=False):
    return _orig(plan, batch_size, prefetch=prefetch, depth=D, pinned=pinned)


particles.iter_batches = iter_batches
import mpi_em.jobs.reconstruct as rec  # noqa: E402

rec.iter_batches = iter_batches
from mpi_em.cli import main  # noqa: E402

sys.exit(main())
