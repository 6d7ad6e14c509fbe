"""mpi_em's CLI with parts switched off for an A/B measurement: VARIANT contains nopreload / nomask."""
import os, sys
v = os.environ.get("VARIANT", "")
if "nopreload" in v:
    import mpi_em.plots as p
    p.preload = lambda: None
if "nomask" in v:
    import mpi_em.fourier.division as d, mpi_em.distvolume.reconstruct as r, mpi_em.fourier2d as f2
    ident = lambda vol, *a, **k: vol
    d.soft_mask_outside = r.soft_mask_outside = f2.soft_mask_outside = ident
from mpi_em.cli import main
sys.exit(main())
