"""`mpi-em reconstruct`: distributed reconstruction from known poses, with gold-standard half maps and FSC.

Data path: rank 0 reads and checks the STAR file and the stacks' headers, assigns half sets, partitions the
particles and scatters the plan (metadata only). Each rank reads its own images, prepares CTF.X and CTF^2 and
inserts them into two half-set accumulators. The volume is stride-distributed (:mod:`mpi_em.distvolume`): rank r
owns the kz planes z = r (mod P). By default each rank inserts into full local partial sums that are
reduce-scattered to the owners once (optionally compressed); under ``--max-volume-memory`` smaller than the full
accumulators each rank holds only its owned planes and every batch's stencil contributions are routed to their
owners. Half 1, half 2 and the combined map are reconstructed distributed (regularised division and inverse FFT
with one all-to-all transpose), every rank gets the maps, rank 0 computes the FSC and writes every output
atomically.
"""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from ..backend import get_xp, synchronize, to_host
from ..distributed import assign_halves, collective_step, log_placement, make_plan, root_step, select_device
from ..distvolume import PlaneOwnerAccumulator, distributed_reconstruct, reduce_scatter_planes, volume_bytes_per_rank
from ..errors import InputError
from ..em.engine import prepare_batch
from ..fourier import SliceGeometry, padded_reach
from ..symmetrise import symmetrise
from ..fsc import fsc, resolution_at, shell_frequencies
from ..geometry import euler_to_matrix
from ..io import atomic_path, check_stacks, check_writable_dir, read_particles, write_map
from ..io.sanity import check_box, check_half_sets, warn_absurd_values
from ..io.star_tables import write_fsc_star
from ..particles import iter_batches, pinned_wanted
from ..reconstruction import Accumulators, insert
from ..symmetry import symmetry_matrices

log = logging.getLogger("mpi_em")


def add_arguments(p) -> None:
    p.add_argument("--i", dest="input", required=True, metavar="STAR",
                   help="particles STAR file (RELION 3.1+; rlnImageName, CTF and pose columns)")
    p.add_argument("--o", dest="output", required=True, metavar="DIR",
                   help="output folder (created; half1.mrc, half2.mrc, map.mrc, fsc.star, fsc.png, run.json)")
    p.add_argument("--sym", default="C1", help="point-group symmetry: C<n>, D<n>, T, O, I (default C1); applied to the summed "
                   "accumulators (RELION's symmetrise), or per inserted copy with --max-volume-memory")
    p.add_argument("--batch", type=int, default=256, help="particles per insertion batch (default 256)")
    p.add_argument("--r-max", type=float, default=None,
                   help="highest frequency inserted, in Fourier pixels (default box/2: Nyquist, as relion_reconstruct)")
    p.add_argument("--pad", type=int, default=2, help="Fourier padding factor of the volume (default 2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="auto: one GPU per rank when CuPy sees one, else CPU")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for half-set assignment when rlnRandomSubset is absent (default 0)")
    p.add_argument("--no-ctf", action="store_true", help="ignore the CTF (images are not CTF-corrected)")
    p.add_argument("--max-volume-memory", default=None, metavar="SIZE",
                   help="bytes of volume work per rank (e.g. 512M, 4G). When the full padded accumulators do not "
                        "fit, each rank keeps only its owned kz planes and every batch's contributions are sent to "
                        "their owners (smaller batches, more messages); default: no limit (local full partial sums, "
                        "reduce-scattered once)")
    p.add_argument("--accumulate", choices=("auto", "double", "single"), default="auto",
                   help="precision of the Fourier accumulators: 'double' (complex128 F, float64 W: 24 bytes per "
                        "voxel) or 'single' (complex64, float32: 12 bytes; the reconstruction in single precision "
                        "too); maps equal to float32 rounding. 'auto' (default): double unless the memory model "
                        "says it does not fit (--max-memory or the device) and single does")
    p.add_argument("--compress", action="store_true",
                   help="compress the accumulators sent in the reduce-scatter (lossless: half-ball packing, byte "
                        "shuffle, zstd); pays when the network, not the CPU, is the bottleneck")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the output folder (its files are removed first); without it "
                        "a folder that holds another job's results is refused")


def _load(args, size):
    check_writable_dir(args.output)
    star = read_particles(args.input)
    check_box(star)
    check_stacks(star)
    warn_absurd_values(star)
    symmetry_matrices(args.sym)  # validates the name before any rank starts reading
    halves = assign_halves(star.n, star.random_subset, args.seed)
    check_half_sets(star, halves)
    plans = make_plan(star, size, seed=args.seed, halves=halves)
    meta = {"box": int(star.box[0]), "pixel_size": float(star.pixel_size[0]), "n": star.n}
    return plans, meta


def insert_plan(plan, acc: Accumulators, box: int, pixel_size: float, batch: int, use_ctf=True,
                progress=None) -> int:
    """Insert a rank's particles into ``acc`` (volume = half set - 1). Returns the number inserted."""
    xp = acc.geom.xp
    done = 0
    for sl, imgs in iter_batches(plan, batch, pinned=pinned_wanted(xp)):
        insert(acc, *_image_batch(plan, sl, imgs, acc.geom, box, pixel_size, use_ctf))
        done += sl.stop - sl.start
        if progress:
            progress(done)
    synchronize(xp)
    return done


def parse_bytes(text) -> int | None:
    """'512M', '2G', '1.5GiB', '1000000' -> bytes (binary units); None/'' -> None."""
    if text is None or str(text).strip() == "":
        return None
    t = str(text).strip().upper().replace("IB", "").rstrip("B")
    mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError:
        raise InputError("--max-volume-memory", f"cannot read {text!r} as a size (e.g. 512M, 2G)") from None


#: upper estimate of the bytes per in-ball point of one image in the streaming insertion: 8 stencil corners x
#: (indices, weights, F/W values, the routed record sent and received, sort and scatter temporaries);
#: tracemalloc measured 115-156 bytes per corner at box 32 (P = 1..8, batch 1-64); 192 leaves a margin.
STREAM_BYTES_PER_POINT = 8 * 192
#: bytes per box^3 voxel of the finished maps: three float32 maps kept, float64 all-gather buffers
MAP_BYTES_PER_VOXEL = 3 * 4 + 2 * 8


def volume_plan(box: int, pad: int, r_max: float, size: int, budget_text, batch: int) -> dict:
    """How the volume is held: 'dense' (full local partial sums, reduce-scattered) or 'stream' (owned planes
    only, contributions routed to their owners per batch), with the batch size that keeps a rank under
    ``budget`` bytes. Raises :class:`MpiEmError` when even the owned planes do not fit."""
    budget = parse_bytes(budget_text)
    mem = volume_bytes_per_rank(box, pad, size, n_vol=2)
    full = mem["allreduce"]
    common = {"full_bytes": full, "owned_bytes": mem["stride_max"], "budget": budget}
    if budget is None or full + mem["stride_max"] <= budget:
        return dict(common, mode="dense", batch=batch)
    n_points = SliceGeometry(box, r_max=r_max, pad=pad, xp=np).m
    # owned planes of both halves + one volume's reconstruction transient at a time (half 1, half 2,
    # combined) + the maps
    one = volume_bytes_per_rank(box, pad, size, n_vol=1)
    fixed = mem["stride_max"] + one["stride_reconstruct_transient_max"] + MAP_BYTES_PER_VOXEL * box ** 3
    per_image = n_points * STREAM_BYTES_PER_POINT + 4 * box * box * 8
    b = (budget - fixed) // per_image
    if b < 1:
        need = fixed + per_image
        raise InputError("--max-volume-memory", f"{budget} bytes is too small for box {box} (pad {pad}) on {size} "
                         f"rank(s): each rank needs at least {need} bytes ({mem['stride_max']} for its owned "
                         f"planes) - use more ranks or a larger budget")
    return dict(common, mode="stream", batch=int(min(batch, b)))


def _image_batch(plan, sl, imgs, geom, box, apix, use_ctf):
    """(half index (n,), rotations (n,3,3), data = CTF.X (n, m), weights = CTF^2) of one batch: the E-step's
    batch preparation (images re-centred on their origins, in-ball values, CTFs) with the known poses."""
    xp = geom.xp
    A = euler_to_matrix(plan["rot"][sl], plan["tilt"][sl], plan["psi"][sl], xp=xp)
    X, ctf = prepare_batch(imgs, plan, sl, geom, box, apix, use_ctf=use_ctf)
    return plan["half"][sl] - 1, A, ctf * X, ctf * ctf


def stream_plan(comm, plan, acc: PlaneOwnerAccumulator, geom, box, apix, batch, sym_mats, use_ctf,
                progress=None) -> int:
    """Collective streaming insertion: every rank takes part in the same number of routed rounds; a rank
    whose batch fails (bad file, NaN) sends its error in the round, and every rank raises RankFailed."""
    from mpi4py import MPI

    xp = geom.xp
    n_local = len(plan["index"])
    n_rounds = comm.allreduce(-(-n_local // batch), op=MPI.MAX)
    mats = [None] if sym_mats is None else [xp.asarray(L, dtype=xp.float64) for L in sym_mats]
    batches = iter_batches(plan, batch, pinned=pinned_wanted(xp))
    done = 0
    for _ in range(n_rounds):
        try:
            item = next(batches, None)
            prepared = None if item is None else (item[0], _image_batch(plan, item[0], item[1], geom, box, apix,
                                                                        use_ctf))
        except Exception as e:  # noqa: BLE001 - sent to every rank in this round
            acc.fail(e)  # the other ranks are in the same round: every rank raises RankFailed here
        for L in mats:
            if prepared is None:
                acc.add_empty()
            else:
                half, A, data, weights = prepared[1]
                acc.backproject(half, A if L is None else A @ L, data, weights, geom)
        if prepared is not None:
            done += prepared[0].stop - prepared[0].start
            if progress:
                progress(done)
    synchronize(xp)
    return done


def run(args, comm) -> dict:
    import tracemalloc

    t0 = time.time()
    plans, meta = root_step(comm, _load, args, comm.size)
    plan = comm.scatter(plans, root=0)
    del plans
    device = collective_step(comm, select_device, comm, args.device)
    xp = get_xp(device)
    log_placement(comm, device, log)
    box, apix = meta["box"], meta["pixel_size"]
    r_max = box // 2 if args.r_max is None else args.r_max
    vplan = root_step(comm, volume_plan, box, args.pad, r_max, comm.size, getattr(args, "max_volume_memory", None),
                      args.batch)
    budget = vplan["budget"]
    compress = bool(getattr(args, "compress", False))
    if comm.rank == 0:
        log.info("reconstruct: %d particles, box %d, %.3f Å/px, %s, %d rank(s); rank 0 on %s",
                 meta["n"], box, apix, args.sym, comm.size, device)
        log.info("volume: %s; full accumulators %.1f MiB (all-reduce design), owned planes %.1f MiB per rank%s%s",
                 "streamed to plane owners" if vplan["mode"] == "stream" else "local partial sums, reduce-scattered",
                 vplan["full_bytes"] / 2 ** 20, vplan["owned_bytes"] / 2 ** 20,
                 f", batch {vplan['batch']} for a budget of {budget / 2 ** 20:.1f} MiB" if budget else "",
                 ", compressed reduce-scatter" if compress and vplan["mode"] == "dense" else "")
    from ..memory import check as memory_check, gpu_allocator_of, reconstruct_inputs  # exit 2 if it does not fit
    memory = memory_check(comm, reconstruct_inputs(args, meta, comm.size, device, vplan, r_max),
                          getattr(args, "max_memory", None), log, precision=getattr(args, "accumulate", "double"))
    inputs = memory.inputs
    from ..memory import keep_fft_plans

    keep_fft_plans(xp, None, None)  # one reconstruction: its plans are given back after it, as the model counts
    cdt = np.complex64 if inputs.accumulate == "single" else np.complex128
    sym = symmetry_matrices(args.sym)
    sym_mats = None if len(sym) == 1 else sym
    geom = SliceGeometry(box, r_max=r_max, pad=args.pad, xp=xp)
    n_local = len(plan["index"])
    step = max(1, n_local // 10)
    last = [0]

    def progress(done):
        if comm.rank == 0 and (done - last[0] >= step or done == n_local):
            last[0] = done
            log.info("  inserted %d / %d particles on rank 0 (%.0f%%)", done, n_local,
                     100.0 * done / max(n_local, 1))

    trace = budget is not None and xp is np
    if trace:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    t_ins = time.time()
    t_red = 0.0
    sent = 0
    if vplan["mode"] == "stream":
        acc = PlaneOwnerAccumulator(comm, geom.vol_shape, n_vol=2, xp=xp, dtype=cdt)
        stream_plan(comm, plan, acc, geom, box, apix, vplan["batch"], sym_mats, not args.no_ctf, progress)
        F_own, W_own = acc.F, acc.W
        sent = acc.n_sent * acc._rec.itemsize
        acc.free()
        t_ins = time.time() - t_ins
    else:
        def _insert():
            acc = Accumulators(geom, n_vol=2, dtype=cdt)
            insert_plan(plan, acc, box, apix, args.batch, not args.no_ctf, progress)
            if sym_mats is not None:  # RELION's symmetrise of the (partial) sums: linear, so before the reduction
                symmetrise(acc.F, acc.W, sym_mats)
            return acc

        dense = collective_step(comm, _insert)
        t_ins = time.time() - t_ins
        t_red = time.time()
        rp = padded_reach(r_max, args.pad)
        st_F, st_W = {}, {}
        F_own = reduce_scatter_planes(comm, dense.F, compress=compress, r_max_padded=rp, check=False, stats=st_F)
        W_own = reduce_scatter_planes(comm, dense.W, compress=compress, r_max_padded=rp, check=False, stats=st_W)
        sent = int(st_F["bytes_sent"] + st_W["bytes_sent"])
        del dense
        t_red = time.time() - t_red
        if comm.rank == 0:
            log.info("accumulators summed over the ranks' planes (%.1f s, %.1f MiB sent by rank 0)", t_red,
                     sent / 2 ** 20)
    t_rec = time.time()

    def one_map(F, W, what):  # RELION's reconstruction (relion_reconstruct, benchmarks/relion_parity.py): up to
        # Nyquist, soft mask outside the sphere of diameter N; F, W: one volume's owned planes (1, ...)
        t = time.time()
        out = to_host(distributed_reconstruct(comm, F, W, box, args.pad, r_max, mask_outside=True)[0]) \
            .astype(np.float32)
        if comm.rank == 0:
            log.info("%s reconstructed (%.1f s)", what, time.time() - t)
        return out

    half1 = one_map(F_own[0:1], W_own[0:1], "half map 1")
    half2 = one_map(F_own[1:2], W_own[1:2], "half map 2")
    F_own[0] += F_own[1]
    W_own[0] += W_own[1]
    full = one_map(F_own[0:1], W_own[0:1], "map of both halves")
    del F_own, W_own
    from ..memory import release_device_memory

    release_device_memory(xp)  # the ranks sharing rank 0's GPU give back what the FSC will use
    t_rec = time.time() - t_rec
    peak = None
    if trace:
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    peaks = comm.gather(peak, root=0)
    sent_all = comm.gather(sent, root=0)

    def _finish():
        # GPU: the half maps' FSC on the device, in single precision (numpy's FFT takes minutes at box 1024)
        curve = fsc(xp.asarray(half1), xp.asarray(half2), single=True) if xp is not np else fsc(half1, half2)
        res = resolution_at(curve, box, apix)
        freqs = shell_frequencies(box, apix)
        out = args.output
        write_map(os.path.join(out, "half1.mrc"), half1, apix)
        write_map(os.path.join(out, "half2.mrc"), half2, apix)
        write_map(os.path.join(out, "map.mrc"), full, apix)
        write_fsc_star(os.path.join(out, "fsc.star"), freqs, curve)
        from ..plots import fsc_png

        fsc_png(os.path.join(out, "fsc.png"), freqs, {"half1 vs half2": curve},
                title=f"gold-standard FSC: {res:.2f} Å at 0.143")
        summary = {"n_particles": meta["n"], "box": box, "pixel_size": apix, "sym": args.sym,
                   "ranks": comm.size, "device_rank0": device, "resolution_0143": res,
                   "volume_mode": vplan["mode"], "batch": vplan["batch"], "compress": compress,
                   "max_volume_memory": budget, "volume_bytes_allreduce_design": vplan["full_bytes"],
                   "volume_bytes_owned_per_rank": vplan["owned_bytes"],
                   "peak_traced_bytes_per_rank": peaks if trace else None,
                   "bytes_sent_per_rank": sent_all,
                   "memory": dict(memory.as_dict(), gpu_allocator=gpu_allocator_of(memory.inputs)),
                   "seconds_total": time.time() - t0, "seconds_insert": t_ins, "seconds_reduce": t_red,
                   "seconds_reconstruct": t_rec}
        with atomic_path(os.path.join(out, "run.json")) as tmp:
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=2)
        log.info("gold-standard resolution %.2f Å (FSC 0.143); outputs in %s (%.1f s)", res, out,
                 summary["seconds_total"])
        return summary

    return root_step(comm, _finish)
