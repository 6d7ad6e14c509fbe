"""`mpi-em simulate`: a simulated data set with known truth (particles STAR, MRC stacks, truth map)."""
from __future__ import annotations

import logging
import os

from ..errors import MpiEmError

log = logging.getLogger("mpi_em")


def add_arguments(p) -> None:
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
    p.add_argument("--start-lowpass", type=float, default=None, metavar="RES",
                   help="also write start.mrc, a start map for refine3d and class3d that knows the particle only "
                        "to RES Å: the truth (with --conformations 2 the mean of the two, favouring neither) "
                        "low-passed to RES Å (default: no start map)")


def run(args, comm) -> None:
    from ..distributed import root_step
    from ..io import check_writable_dir
    import numpy as np

    from ..simulate import clean_projections, phantom, simulate_particles, view_poses, write_dataset

    def work():
        check_writable_dir(args.out)
        if args.box % 2 or args.box < 16:
            raise MpiEmError(f"--box must be even and >= 16, got {args.box}")
        from ..backend import default_device, get_xp

        xp = get_xp(default_device() if args.device == "auto" else args.device)
        if args.views < 0:
            raise MpiEmError(f"--views must be >= 0, got {args.views}")
        if args.start_lowpass is not None and not args.start_lowpass >= 2 * args.apix:
            raise MpiEmError(f"--start-lowpass must be at least Nyquist (2 x --apix = {2 * args.apix:g} Å), "
                             f"got {args.start_lowpass:g}")
        if args.views and args.conformations > 1:
            raise MpiEmError("--views and --conformations 2 label rlnClassNumber differently; use one of them")
        shape = {"n_domains": args.domains, "domain_spread": args.domain_spread,
                 "domain_distance": args.domain_distance}
        vol = phantom(args.box, seed=args.seed, sym=args.sym, xp=xp, **shape)
        vols, poses, class_of, what = vol, None, None, ""
        if args.conformations > 1:
            vols = [vol, phantom(args.box, seed=args.seed, sym=args.sym, remove_domain=-1, xp=xp, **shape)]
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
        path = write_dataset(args.out, vols, sim, args.apix, per_stack=args.per_stack, seed=args.seed,
                             start_resolution=args.start_lowpass)
        if args.views:
            from ..io import write_stack

            write_stack(os.path.join(args.out, "views.mrcs"), clean_projections(vol, vrot, vtilt), args.apix)
        log.info("simulated %d particles (box %d, %.2f Å/px, SNR %g, %s%s): %s", args.n, args.box, args.apix,
                 args.snr, args.sym, what, path)

    root_step(comm, work)
