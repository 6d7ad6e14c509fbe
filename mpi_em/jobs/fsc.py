"""`mpi-em fsc`: the FSC of two maps and the resolution at a threshold (STAR table, PNG)."""
from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("map1", help="first map (MRC)")
    p.add_argument("map2", help="second map (MRC)")
    p.add_argument("--plot", metavar="PNG", help="write the FSC curve as a PNG")
    p.add_argument("--o", dest="output", metavar="STAR", help="write the FSC curve as a STAR table")
    p.add_argument("--threshold", type=float, default=0.143, help="FSC threshold for the resolution (default 0.143)")


def run(args, comm) -> None:
    from ..distributed import root_step

    def work():
        from ..errors import InputError
        from ..fsc import fsc, resolution_at, shell_frequencies
        from ..io import read_map

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
            from ..io.star_tables import write_fsc_star

            write_fsc_star(args.output, freqs, curve)
        if args.plot:
            from ..plots import fsc_png

            fsc_png(args.plot, freqs, {"FSC": curve}, title=f"{res:.2f} Å at {args.threshold}",
                    threshold=args.threshold)
        print(f"resolution at FSC {args.threshold}: {res:.3f} Å")

    root_step(comm, work)
