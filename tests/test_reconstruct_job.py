"""`mpi-em reconstruct` end to end: P ranks = 1 rank, resolution vs truth, outputs, bad input."""
import hashlib
import json
import os
import shutil

import mrcfile
import numpy as np
import pytest

from conftest import mpi_em
from mpi_em.fsc import fsc, resolution_at


def _maps(out):
    return {k: mrcfile.read(os.path.join(out, f"{k}.mrc")) for k in ("half1", "half2", "map")}


@pytest.fixture(scope="module")
def one_rank(small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("r1")
    r = mpi_em(["reconstruct", "--i", small_dataset / "particles.star", "--o", out, "--batch", 64], ranks=1)
    assert r.returncode == 0, r.stderr
    return out


def test_outputs_valid(one_rank):
    for name in ("half1.mrc", "half2.mrc", "map.mrc"):
        assert mrcfile.validate(os.path.join(one_rank, name))
        with mrcfile.open(os.path.join(one_rank, name)) as m:
            assert m.voxel_size.x == pytest.approx(4.0)
    for name in ("fsc.star", "fsc.png", "run.json", "run.log"):
        assert os.path.getsize(os.path.join(one_rank, name)) > 0
    assert not [f for f in os.listdir(one_rank) if ".tmp" in f]


@pytest.mark.parametrize("ranks", [2, 3])
def test_p_ranks_equal_one_rank(small_dataset, one_rank, tmp_path, ranks):
    """Sums of float64 accumulators in another order: maps equal to float32 output precision."""
    r = mpi_em(["reconstruct", "--i", small_dataset / "particles.star", "--o", tmp_path, "--batch", 64],
               ranks=ranks)
    assert r.returncode == 0, r.stderr
    a, b = _maps(one_rank), _maps(tmp_path)
    for k in a:
        scale = np.abs(a[k]).max()
        assert np.abs(a[k] - b[k]).max() <= 1e-5 * scale, k


@pytest.mark.parametrize("ranks,stream", [(1, False), (2, False), (4, True)])
def test_single_precision_accumulators_equal_double(small_dataset, one_rank, tmp_path, ranks, stream):
    """--accumulate single (complex64 / float32 accumulators, single-precision reconstruction; with
    --max-volume-memory the streamed owned planes in single too): the maps of the double-precision job to
    float32 rounding of ~600 insertions per voxel and three FFT passes (sqrt(n) x u ~ 1.5e-6; asserted 1e-5 of
    the largest value); the precision in run.json."""
    ref = one_rank
    extra = ["--r-max", 15, "--max-volume-memory", "5.0M"] if stream else []  # below the full 6.5 MB
    if stream:  # its own double-precision run (another r_max)
        ref = tmp_path / "double"
        r = mpi_em(["reconstruct", "--i", small_dataset / "particles.star", "--o", ref, "--batch", 64,
                    "--accumulate", "double"] + extra, ranks=ranks)
        assert r.returncode == 0, r.stderr
    r = mpi_em(["reconstruct", "--i", small_dataset / "particles.star", "--o", tmp_path / "s", "--batch", 64,
                "--accumulate", "single"] + extra, ranks=ranks)
    assert r.returncode == 0, r.stderr
    run = json.load(open(tmp_path / "s" / "run.json"))
    assert run["memory"]["inputs"]["accumulate"] == "single" and run["volume_mode"] == ("stream" if stream else "dense")
    assert run["memory"]["gpu_allocator"] is None  # CPU ranks (GPU ranks: tests/test_gpu.py)
    a, b = _maps(ref), _maps(tmp_path / "s")
    for k in a:
        assert np.abs(a[k] - b[k]).max() <= 1e-5 * np.abs(a[k]).max(), k


def test_compressed_reduce_scatter_equals_one_rank(small_dataset, one_rank, tmp_path):
    """--compress: lossless codec in the reduce-scatter; only the summation order changes (float64 sums,
    float32 maps): equal to output precision on 3 ranks (uneven plane split)."""
    r = mpi_em(["reconstruct", "--i", small_dataset / "particles.star", "--o", tmp_path, "--batch", 64,
                "--compress"], ranks=3)
    assert r.returncode == 0, r.stderr
    a, b = _maps(one_rank), _maps(tmp_path)
    for k in a:
        assert np.abs(a[k] - b[k]).max() <= 1e-5 * np.abs(a[k]).max(), k


def test_symmetrised_sums_equal_per_copy_streaming(small_dataset, tmp_path):
    """--sym D2: with full accumulators every rank symmetrises its partial sums (RELION's symmetrise); in
    streaming mode (--max-volume-memory) each pose is routed once per operator. D2's 180-degree operators map
    the grid onto itself, so both paths compute the same sums (tests/test_fourier.py): maps equal to float32
    output precision, on 2 ranks vs 3 ranks; and the map is D2-symmetric although the particle is not."""
    common = ["reconstruct", "--i", small_dataset / "particles.star", "--batch", 64, "--sym", "D2"]
    r = mpi_em(common + ["--o", tmp_path / "dense"], ranks=2)
    assert r.returncode == 0, r.stderr
    r = mpi_em(common + ["--o", tmp_path / "stream", "--max-volume-memory", "8M"], ranks=3)
    assert r.returncode == 0, r.stderr
    a, b = _maps(tmp_path / "dense"), _maps(tmp_path / "stream")
    for k in a:
        assert np.abs(a[k] - b[k]).max() <= 1e-5 * np.abs(a[k]).max(), k
    m = a["map"][1:, 1:, 1:]  # D2 about the centre N//2: (x, y, z) -> (-x, -y, z), index 0 has no mirror
    assert np.abs(m - np.flip(m, axis=0)).max() > 0.1 * np.abs(m).max()  # a mirror is not in D2
    for flip in ((1, 2), (0, 1)):  # the 2-fold about z flips (y, x); about x flips (z, y) in (z, y, x) order
        assert np.abs(m - np.flip(m, axis=flip)).max() <= 1e-5 * np.abs(m).max(), flip


def test_memory_budget_below_one_volume(small_dataset, tmp_path):
    """--max-volume-memory 3.0M on 8 ranks (oversubscribed): below ONE padded volume's accumulators
    (64 x 64 x 33 voxels x (16 + 8) bytes = 3.24 MB), let alone the two half-set volumes (6.5 MB) that the
    all-reduce design holds on every rank. Each rank keeps only its owned kz planes; contributions are routed
    to their owners per batch. The map equals the 1-rank map to output precision, and every rank's traced
    peak (tracemalloc: all NumPy/Python allocations from insertion to the finished maps) stays under the budget.
    A budget too small for the owned planes is refused with a clear error (exit 2). Frequencies up to N/2 - 1
    (--r-max 15): the default N/2 has 13% more points per image, whose upper estimate of the routed records
    (STREAM_BYTES_PER_POINT) no longer fits one image into this budget."""
    budget = 3 * 2 ** 20
    one_volume = 64 * 64 * 33 * (16 + 8)
    assert budget < one_volume
    r = mpi_em(["reconstruct", "--i", small_dataset / "particles.star", "--o", tmp_path / "b", "--r-max", 15,
                "--max-volume-memory", "3.0M"], ranks=8, timeout=240)
    assert r.returncode == 0, r.stderr
    info = json.load(open(tmp_path / "b" / "run.json"))
    assert info["volume_mode"] == "stream" and info["volume_bytes_allreduce_design"] == 2 * one_volume
    peaks = info["peak_traced_bytes_per_rank"]
    assert len(peaks) == 8 and max(peaks) <= budget, peaks
    r = mpi_em(["reconstruct", "--i", small_dataset / "particles.star", "--o", tmp_path / "a", "--r-max", 15,
                "--batch", 64], ranks=1)
    assert r.returncode == 0, r.stderr
    a, b = _maps(tmp_path / "a"), _maps(tmp_path / "b")
    for k in a:
        assert np.abs(a[k] - b[k]).max() <= 1e-5 * np.abs(a[k]).max(), k
    r = mpi_em(["reconstruct", "--i", small_dataset / "particles.star", "--o", tmp_path / "c",
                "--max-volume-memory", "1M"], ranks=2, timeout=120)
    err = [line for line in r.stderr.splitlines() if line.startswith("mpi-em: error:")]
    assert r.returncode == 2 and len(err) == 1 and "--max-volume-memory" in err[0] and "too small" in err[0]
    assert not os.path.exists(tmp_path / "c" / "map.mrc")


def test_half_map_resolution_matches_truth(tmp_path):
    """SNR 0.1, 5k particles, box 64: gold-standard FSC(0.143) within 10% of the map-vs-truth FSC(0.5)
    resolution (the two criteria are equivalent for unbiased half maps: C_ref = sqrt(2 FSC / (1 + FSC)))."""
    d = tmp_path / "data"
    r = mpi_em(["simulate", "--out", d, "--box", 64, "--n", 5000, "--snr", 0.1, "--seed", 3], ranks=0)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "rec"
    r = mpi_em(["reconstruct", "--i", d / "particles.star", "--o", out], ranks=2)
    assert r.returncode == 0, r.stderr
    m = _maps(out)
    truth = mrcfile.read(d / "truth.mrc")
    res_gold = resolution_at(fsc(m["half1"], m["half2"]), 64, 2.5, 0.143)
    res_truth = resolution_at(fsc(m["map"], truth), 64, 2.5, 0.5)
    assert abs(res_gold - res_truth) <= 0.1 * res_truth, (res_gold, res_truth)
    assert res_gold < 12.0  # 5k particles at SNR 0.1 resolve well past 1/4 Nyquist (20 Å)


def test_missing_halves_are_assigned(small_dataset, tmp_path):
    import starfile
    blocks = starfile.read(small_dataset / "particles.star", always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnRandomSubset"])
    d = tmp_path / "d"
    shutil.copytree(small_dataset, d)
    starfile.write(blocks, d / "particles.star", float_format=None)
    r = mpi_em(["reconstruct", "--i", d / "particles.star", "--o", tmp_path / "o"], ranks=2)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "o" / "half2.mrc")


# ------------------------------------------------------------------------------------------ bad input
def _digest(folder):
    h = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            h[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


@pytest.fixture
def bad_copy(small_dataset, tmp_path):
    d = tmp_path / "in"
    shutil.copytree(small_dataset, d)
    return d


def _run_bad(d, tmp_path, ranks=2, extra=()):
    before = _digest(d)
    out = tmp_path / "out"
    r = mpi_em(["reconstruct", "--i", d / "particles.star", "--o", out] + list(extra), ranks=ranks, timeout=120)
    assert _digest(d) == before, "inputs were modified"
    if os.path.isdir(out):
        assert not [f for f in os.listdir(out) if f.endswith((".mrc", ".star", ".png", ".json"))], \
            "partial outputs left behind"
    errors = [line for line in r.stderr.splitlines() if line.startswith("mpi-em: error:")]
    return r, errors


def _edit_star(d, fn):
    import starfile
    blocks = starfile.read(d / "particles.star", always_dict=True)
    fn(blocks)
    starfile.write(blocks, d / "particles.star", float_format=None)


def test_missing_stack(bad_copy, tmp_path):
    os.remove(bad_copy / "stacks" / "particles_0001.mrcs")
    r, err = _run_bad(bad_copy, tmp_path)
    assert r.returncode == 2 and len(err) == 1
    assert "particles_0001.mrcs" in err[0] and "rlnImageName" in err[0]


def test_row_past_end_of_stack(bad_copy, tmp_path):
    def f(b):
        b["particles"].loc[5, "rlnImageName"] = "000999@stacks/particles_0000.mrcs"
    _edit_star(bad_copy, f)
    r, err = _run_bad(bad_copy, tmp_path)
    assert r.returncode == 2 and len(err) == 1
    assert "particles_0000.mrcs" in err[0] and "rlnImageName" in err[0] and "999" in err[0]


def test_truncated_mrc(bad_copy, tmp_path):
    p = bad_copy / "stacks" / "particles_0001.mrcs"
    size = os.path.getsize(p)
    with open(p, "r+b") as fh:
        fh.truncate(size - 5000)
    r, err = _run_bad(bad_copy, tmp_path)
    assert r.returncode == 2 and len(err) == 1 and "particles_0001.mrcs" in err[0]


def test_corrupt_header(bad_copy, tmp_path):
    p = bad_copy / "stacks" / "particles_0000.mrcs"
    with open(p, "r+b") as fh:
        fh.write(b"\xff" * 256)
    r, err = _run_bad(bad_copy, tmp_path)
    assert r.returncode == 2 and len(err) == 1 and "particles_0000.mrcs" in err[0]


@pytest.mark.parametrize("mode", ["dense", "stream"])
def test_nan_pixels_on_the_second_rank(bad_copy, tmp_path, mode):
    """The NaN image is read by rank 1 only: rank 1 reports it, no rank hangs, nothing is written. In the
    streaming mode (--max-volume-memory below the full accumulators) the other rank is inside a routed
    all-to-all round when rank 1 fails: the failure travels in that round."""
    p = bad_copy / "stacks" / "particles_0001.mrcs"
    with mrcfile.mmap(p, mode="r+") as m:
        m.data[200, 3, 3] = np.nan
    extra = ["--max-volume-memory", "8M", "--batch", 16] if mode == "stream" else []
    r, err = _run_bad(bad_copy, tmp_path, ranks=2, extra=extra)
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "rank 1" in err[0] and "particles_0001.mrcs" in err[0] and "NaN" in err[0]
    if mode == "stream":
        assert "streamed to plane owners" in r.stdout + r.stderr


def test_mismatched_pixel_size(bad_copy, tmp_path):
    def f(b):
        b["optics"].loc[0, "rlnImagePixelSize"] = 3.0
    _edit_star(bad_copy, f)
    r, err = _run_bad(bad_copy, tmp_path)
    assert r.returncode == 2 and len(err) == 1 and "rlnImagePixelSize" in err[0]


def test_unwritable_output(small_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = mpi_em(["reconstruct", "--i", small_dataset / "particles.star", "--o", blocker / "out"], ranks=2,
               timeout=120)
    err = [line for line in r.stderr.splitlines() if line.startswith("mpi-em: error:")]
    assert r.returncode == 3 and len(err) == 1 and "out" in err[0]


def test_unknown_symmetry(small_dataset, tmp_path):
    r = mpi_em(["reconstruct", "--i", small_dataset / "particles.star", "--o", tmp_path / "o", "--sym", "Q5"],
               ranks=2, timeout=120)
    assert r.returncode != 0 and "Q5" in r.stderr


def test_help_explains_every_option():
    r = mpi_em(["reconstruct", "--help"], ranks=0)
    assert r.returncode == 0
    for opt in ("--i", "--o", "--sym", "--batch", "--r-max", "--pad", "--device", "--seed", "--no-ctf",
                "--max-volume-memory", "--compress"):
        assert opt in r.stdout


def test_auto_precision_takes_single_only_where_double_does_not_fit():
    """--accumulate auto (the default): double precision unless the model says double does not fit the limit
    (then single, the lighter, also where neither fits) (box 1024 known-pose reconstruction on one rank: 206 GB of double accumulators alone)."""
    from mpi4py import MPI

    from mpi_em.memory import ReconstructInputs, check, choose_precision, estimate

    inp = ReconstructInputs(box=1024, pad=2, batch=64, ranks=1, device="gpu", n_particles=20000)
    double, single = (estimate(ReconstructInputs(**{**inp.__dict__, "accumulate": a})).total
                      for a in ("double", "single"))
    assert single < double
    between = f"{(single + double) // 2}"
    pick = lambda size, want="auto": choose_precision(MPI.COMM_SELF, inp, int(size), None,  # noqa: E731
                                                      want).accumulate
    assert pick(between) == "single"
    assert pick(str(double + 1)) == "double"
    assert pick(str(single // 2)) == "single"  # neither fits: the lighter, whose error names what else would fit
    assert check(MPI.COMM_SELF, inp, max_memory=between, precision="auto").inputs.accumulate == "single"
    assert check(MPI.COMM_SELF, inp, max_memory=str(double + 1), precision="auto").inputs.accumulate == "double"
    assert pick(between, "double") == "double" and pick(str(double + 1), "single") == "single"
