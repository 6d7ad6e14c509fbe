"""Faults a real user meets: a full disk, a killed rank, two jobs on one output folder, a changed input under
--continue, degenerate inputs. Every job must end within seconds (never hang), with the documented exit code and
one line naming the file, its last checkpoint intact, and --continue must reproduce the uninterrupted result.

The MPI jobs run under `mpirun -n 2` (box 32, 200 particles, HEALPix order 1, 2 iterations); the disk-full tests
mount a small tmpfs and skip where that is not allowed (not root)."""
import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time

import mrcfile
import numpy as np
import pytest
import starfile

from conftest import MPIRUN, mpi_em
from mpi_em.errors import InputError, MpiEmError, OutputError

N = 200


# ------------------------------------------------------------------------------------------------ helpers
def _errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("mpi-em: error:")]


def _read_star(path):
    return starfile.read(path, always_dict=True)


def _write_star(blocks, path):
    starfile.write(blocks, path, float_format=None)


class Job:
    """A job started in the background; stderr read line by line with the time each line arrived."""

    def __init__(self, args, ranks=2, cwd=None):
        cmd = [sys.executable, "-m", "mpi_em"] + [str(a) for a in args]
        if ranks >= 1:
            if MPIRUN is None:
                pytest.skip("no mpirun on PATH")
            cmd = [MPIRUN, "-n", str(ranks)] + cmd
        env = dict(os.environ, OMP_NUM_THREADS="1", MPI_EM_DEVICE="cpu")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                     env=env, start_new_session=True)
        self.lines = []  # (monotonic time, line)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout=240):
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"the job hung (no exit within {timeout} s); stderr:\n{self.stderr}")
        self.end = time.monotonic()
        self._reader.join(10)
        return rc

    @property
    def stderr(self):
        return "\n".join(line for _, line in self.lines)

    def first_error_time(self):
        return next((t for t, line in self.lines if line.startswith("mpi-em: error:")), None)


def _wait_for(cond, job, timeout=180, what=""):
    t0 = time.monotonic()
    while not cond():
        if job.proc.poll() is not None:
            pytest.fail(f"the job ended before {what}: rc {job.proc.returncode}\n{job.stderr}")
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _iteration_done(out, it):
    def cond():
        try:
            return json.load(open(os.path.join(out, "checkpoint.json")))["iteration"] >= it
        except (OSError, ValueError, KeyError):
            return False
    return cond


def _rank_pids(root):
    """{MPI rank: pid} of the ranks under process ``root`` (mpirun), from /proc (PMI_RANK in the environment)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError):
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
            cmd = open(f"/proc/{pid}/cmdline").read()
            if "PMI_RANK" in env and "mpi_em" in cmd:
                out[int(env["PMI_RANK"])] = pid
    return out


def _checkpoint_intact(out):
    """The checkpoint the pointer names loads (its maps, held in the iteration's map files, with the CRC-32 it
    recorded) and is of the pointer's iteration: its iteration number."""
    from mpi_em.em.state import MODES, EMState

    ptr, state, particles = EMState.load(out, MODES["refine3d"])
    assert state.iter == ptr["iteration"]
    assert np.isfinite(state.maps).all() and len(particles["rot"]) == N
    return ptr["iteration"]


def _same_result(a, b):
    """Final poses and map of two runs, bit for bit."""
    sa, sb = _read_star(os.path.join(a, "run_data.star")), _read_star(os.path.join(b, "run_data.star"))
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    assert np.array_equal(sa["particles"][cols].to_numpy(), sb["particles"][cols].to_numpy())
    assert np.array_equal(mrcfile.read(os.path.join(a, "run_class001.mrc")),
                          mrcfile.read(os.path.join(b, "run_class001.mrc")))


@contextlib.contextmanager
def _tmpfs(path, size="16m"):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder):
    """Fill the file system of ``folder`` to the last byte; returns the filler's path."""
    path = os.path.join(folder, "filler")
    with open(path, "wb", buffering=0) as f:
        for block in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * block)
    return path


# ----------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    r = mpi_em(["simulate", "--out", d, "--box", 32, "--n", N, "--snr", 1.0, "--apix", 4.0, "--seed", 4,
                "--per-stack", 120, "--start-lowpass", 32], ranks=0)
    assert r.returncode == 0, r.stderr
    return d


def _refine_args(d, out, star="particles_unaligned.star", ref="start.mrc"):
    return ["refine3d", "--i", os.path.join(d, star), "--ref", os.path.join(d, ref), "--ini-high", 32,
            "--healpix-order", 1, "--max-order", 1, "--iter", 2, "--o", out]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted 2-rank run the interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    job = Job(_refine_args(data, out))
    assert job.wait() == 0, job.stderr
    return out


# ----------------------------------------------------------------------------------------- unit checks
def test_errors_survive_pickling():
    """The background writer process sends its error back pickled: InputError/OutputError/RankFailed must come
    back with the same message and exit code (they used to fail with a TypeError, exit 1)."""
    from mpi_em.distributed import RankFailed

    for e in (InputError("a.star", "bad", field="rlnImageName"), InputError("a.mrc", "bad"),
              OutputError("/x/run.json", "cannot write: No space left on device"),
              RankFailed(["rank 0: x", "rank 1: y"], exit_code=3)):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.exit_code == e.exit_code


def _raise_output_error(path):
    raise OutputError(path, "cannot write: No space left on device")


def test_background_writer_returns_the_output_error(tmp_path):
    from mpi_em.io import BackgroundWriter

    w = BackgroundWriter(use_process=True)
    w.submit(_raise_output_error, str(tmp_path / "x.mrc"))
    with pytest.raises(OutputError) as e:
        w.wait()
    assert e.value.exit_code == 3 and "No space left on device" in str(e.value)


def test_an_h5py_style_write_error_is_one_line(tmp_path):
    """h5py reports a full disk as a multi-line OSError without errno: one line with the system's text."""
    from mpi_em.io import atomic_path

    msg = ("Can't synchronously write data (file write failed: time = Tue Dec  1 22:22:40 2026\n, filename = "
           "'x.h5', file descriptor = 38, errno = 28, error message = 'No space left on device', buf = 0x5)")
    with pytest.raises(OutputError) as e:
        with atomic_path(tmp_path / "c.h5"):
            try:
                raise OSError(msg)
            except OSError as inner:
                raise RuntimeError("wrapped") from inner
    assert str(e.value) == f"{tmp_path / 'c.h5'}: cannot write: No space left on device"
    assert not os.listdir(tmp_path)


def test_claim_output_refuses_another_run_and_a_locked_folder(tmp_path):
    from mpi_em.io import atomic

    def release():  # what the end of a job's process does
        for f in atomic._held_locks:
            f.close()
        atomic._held_locks.clear()

    out = tmp_path / "o"
    try:
        assert atomic.claim_output(out)["locked"]  # new folder: created and locked
        with pytest.raises(OutputError, match=r"in use by another mpi-em job \(pid \d+ on .*: mpi-em "):
            atomic.claim_output(out)  # a second open file description: refused like a second job
        release()
        (out / "checkpoint.json").write_text("{}")
        (out / "run_it001_class001.mrc").write_text("x")
        (out / "notes.txt").write_text("mine")
        with pytest.raises(OutputError, match="holds another run .*--overwrite"):
            atomic.claim_output(out)
        release()
        claim = atomic.claim_output(out, overwrite=True)
        assert sorted(claim["removed"]) == ["checkpoint.json", "run_it001_class001.mrc"]
        assert sorted(os.listdir(out)) == [".mpi_em.lock", "notes.txt"]  # only the run's files go
    finally:
        release()


def test_missing_optics_block_is_named(data, tmp_path):
    from mpi_em.io import read_particles

    blocks = _read_star(data / "particles.star")
    parts = blocks["particles"].drop(columns=["rlnOpticsGroup"])
    _write_star({"particles": parts}, tmp_path / "p.star")
    with pytest.raises(InputError, match="no data_optics block"):
        read_particles(tmp_path / "p.star")


# ------------------------------------------------------------------------------------- full disk (tmpfs)
def test_full_disk_from_the_start_ends_every_rank(data, tmp_path):
    """Disk full before the first iteration: run_timings.json (rank 0) cannot be written. Every rank ends
    within seconds of the error (rank 1 used to spin in the next collective forever), exit 3, one line, no
    logging tracebacks."""
    with _tmpfs(tmp_path / "disk", "4m") as disk:
        _fill(disk)
        job = Job(_refine_args(data, disk / "out"))
        rc = job.wait(timeout=240)
        t_err = job.first_error_time()
        assert rc == 3, job.stderr
        errors = _errors(job.stderr)
        assert len(errors) == 1 and "No space left on device" in errors[0], job.stderr
        assert job.end - t_err < 5.0, job.stderr
        assert "Logging error" not in job.stderr and "Traceback" not in job.stderr, job.stderr
        assert job.stderr.count("cannot write") <= 2  # the error, and once the run.log warning


@pytest.mark.slow
def test_full_disk_mid_run_then_continue(data, reference, tmp_path):
    """The disk fills up during iteration 2: the job ends within seconds of the failing write with exit 3 and
    one line, iteration 1's checkpoint intact; with room again, --continue reproduces the uninterrupted run."""
    with _tmpfs(tmp_path / "disk", "16m") as disk:
        out = disk / "out"
        job = Job(_refine_args(data, out))
        _wait_for(_iteration_done(out, 1), job, what="iteration 1's checkpoint")
        filler = _fill(disk)
        rc = job.wait()
        assert rc == 3, job.stderr
        errors = _errors(job.stderr)
        assert len(errors) == 1 and "No space left on device" in errors[0], job.stderr
        assert job.end - job.first_error_time() < 5.0
        assert "Logging error" not in job.stderr and "Traceback" not in job.stderr, job.stderr
        assert _checkpoint_intact(out) == 1
        with open(out / "run.log") as f:  # written before the disk was full; the error could not be added
            assert "iteration 1:" in f.read()
        os.remove(filler)
        job = Job(["refine3d", "--continue", out])
        assert job.wait() == 0, job.stderr
        _same_result(reference, out)


# ------------------------------------------------------------------------------------------ killed rank
@pytest.mark.slow
def test_killed_rank_ends_the_job_and_continue_reproduces(data, reference, tmp_path):
    out = tmp_path / "out"
    job = Job(_refine_args(data, out))
    _wait_for(_iteration_done(out, 1), job, what="iteration 1's checkpoint")
    pids = _rank_pids(job.proc.pid)
    assert sorted(pids) == [0, 1], pids
    t_kill = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    rc = job.wait(timeout=120)
    assert rc != 0 and job.end - t_kill < 10.0, (rc, job.end - t_kill)
    assert _checkpoint_intact(out) >= 1
    job = Job(["refine3d", "--continue", out])
    assert job.wait() == 0, job.stderr
    _same_result(reference, out)


# ------------------------------------------------------------------------------------ one output folder
def test_two_jobs_on_one_output_folder(data, reference, tmp_path):
    """A second job on a folder in use is refused at once (exit 3, one line naming the first job's pid) and does
    not disturb the first, whose result equals the reference bit for bit; once it has ended, a new run into the
    folder is refused because it holds a run."""
    out = tmp_path / "out"
    first = Job(_refine_args(data, out))
    _wait_for(lambda: "pid" in open(out / ".mpi_em.lock").read() if (out / ".mpi_em.lock").exists() else False,
              first, what="the lock")
    second = Job(_refine_args(data, out))
    rc = second.wait(timeout=60)
    errors = _errors(second.stderr)
    assert rc == 3 and len(errors) == 1 and "in use by another mpi-em job (pid" in errors[0], second.stderr
    assert first.proc.poll() is None, "the first job ended before the second was refused"
    assert first.wait() == 0, first.stderr
    _same_result(reference, out)
    r = mpi_em(_refine_args(data, out), ranks=0, timeout=60)
    errors = _errors(r.stderr)
    assert r.returncode == 3 and len(errors) == 1 and "holds another run" in errors[0], r.stderr


def test_overwrite_replaces_a_finished_run(data, tmp_path):
    out = tmp_path / "rec"
    args = ["reconstruct", "--i", data / "particles.star", "--o", out]
    assert mpi_em(args, ranks=0).returncode == 0
    (out / "run_it001_class001.mrc").write_text("an old refinement's file")
    before, before_map = open(out / "map.mrc", "rb").read(), mrcfile.read(out / "map.mrc")
    r = mpi_em(args, ranks=0)
    assert r.returncode == 3 and "holds another run" in _errors(r.stderr)[0]
    assert open(out / "map.mrc", "rb").read() == before  # untouched
    r = mpi_em(args + ["--overwrite"], ranks=0)
    assert r.returncode == 0, r.stderr
    assert not (out / "run_it001_class001.mrc").exists()  # the old run's files are gone, the new map is the same
    assert np.array_equal(mrcfile.read(out / "map.mrc"), before_map)


def test_mistyped_continue_folder_is_not_created(tmp_path):
    r = mpi_em(["refine3d", "--continue", tmp_path / "typo"], ranks=0, timeout=60)
    errors = _errors(r.stderr)
    assert r.returncode == 2 and len(errors) == 1 and "no such folder" in errors[0], r.stderr
    assert not (tmp_path / "typo").exists()


# ------------------------------------------------------------------------------------ --continue input
@pytest.mark.slow
def test_continue_refuses_another_input_and_finds_its_own_from_anywhere(data, tmp_path):
    """The checkpoint records the input's absolute path, count, box, pixel size and image names: another
    particle set at the same path is refused with one line (exit 2); the run's own is found from another
    working directory; a checkpoint without the record (an earlier version) continues with a warning."""
    d = tmp_path / "d"
    shutil.copytree(data, d)
    out = tmp_path / "run"
    env_stop = os.environ.get("MPI_EM_STOP_AFTER_ITERATION")
    os.environ["MPI_EM_STOP_AFTER_ITERATION"] = "1"
    try:  # relative paths, as a user types them in the data folder
        r = mpi_em(_refine_args(".", out), ranks=0, cwd=d)
    finally:
        os.environ.pop("MPI_EM_STOP_AFTER_ITERATION")
        if env_stop is not None:
            os.environ["MPI_EM_STOP_AFTER_ITERATION"] = env_stop
    assert r.returncode == 0, r.stderr
    shutil.copytree(out, tmp_path / "old")
    star = d / "particles_unaligned.star"
    shutil.copy(star, tmp_path / "keep.star")
    for edit, what in ((lambda b: b["particles"].iloc[: N // 2], f"{N // 2} particles instead of {N}"),
                       (lambda b: b["particles"].iloc[::-1], "other images")):
        blocks = _read_star(tmp_path / "keep.star")
        blocks["particles"] = edit(blocks)
        _write_star(blocks, star)
        r = mpi_em(["refine3d", "--continue", out], ranks=0, timeout=60)
        errors = _errors(r.stderr)
        assert r.returncode == 2 and len(errors) == 1, r.stderr
        assert str(star) in errors[0] and "changed since the run" in errors[0] and what in errors[0], errors
    shutil.copy(tmp_path / "keep.star", star)
    # --iter 1: the inputs are read and checked, no iteration is run (the results of a continued run are checked
    # by the kill and full-disk tests)
    r = mpi_em(["refine3d", "--continue", out, "--iter", 1], ranks=0, cwd=tmp_path)  # not the run's folder
    assert r.returncode == 0 and not _errors(r.stderr), r.stderr
    old = tmp_path / "old"
    ptr = json.load(open(old / "checkpoint.json"))
    del ptr["input"]
    ptr["args"]["input"] = str(star)
    json.dump(ptr, open(old / "checkpoint.json", "w"))
    r = mpi_em(["refine3d", "--continue", old, "--iter", 1], ranks=0)
    assert r.returncode == 0 and "has no record of its input" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------ degenerate inputs
def _subset(data, tmp_path, rows, edit=None, name="p.star", src="particles.star"):
    blocks = _read_star(data / src)
    blocks["particles"] = blocks["particles"].iloc[rows].copy()
    if edit:
        edit(blocks["particles"])
    d = tmp_path / "sub"
    if not d.exists():
        shutil.copytree(data, d)
    _write_star(blocks, d / name)
    return d / name


@pytest.mark.parametrize("job", ["reconstruct", "refine3d"])
def test_empty_half_set_is_refused(data, tmp_path, job):
    def all_one(p):
        p["rlnRandomSubset"] = 1

    cases = [(_subset(data, tmp_path, slice(None), all_one, "half.star", "particles_unaligned.star"
                      if job == "refine3d" else "particles.star"), "half set 2 is empty", "rlnRandomSubset"),
             (_subset(data, tmp_path, slice(0, 1), None, "one.star"), "at least 2", "1 particle")]
    for star, text, text2 in cases:
        args = ["reconstruct", "--i", star, "--o", tmp_path / "o"] if job == "reconstruct" else \
            _refine_args(star.parent, tmp_path / "o", star=star.name)
        r = mpi_em(args, ranks=2, timeout=120)
        errors = _errors(r.stderr)
        assert r.returncode == 2 and len(errors) == 1 and text in errors[0] and text2 in errors[0], r.stderr
        assert not [f for f in os.listdir(tmp_path / "o") if f.endswith((".mrc", ".json"))]


def test_odd_box_is_an_input_error(data, tmp_path):
    from mpi_em.io import write_stack

    d = tmp_path / "odd"
    os.makedirs(d)
    first = sorted(os.listdir(data / "stacks"))[0]
    write_stack(d / "odd.mrcs", np.ascontiguousarray(mrcfile.read(data / "stacks" / first)[:50, :31, :31]), 4.0)
    blocks = _read_star(data / "particles.star")
    blocks["optics"]["rlnImageSize"] = 31
    blocks["particles"] = blocks["particles"].iloc[:50].copy()
    blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@odd.mrcs" for i in range(50)]
    _write_star(blocks, d / "odd.star")
    r = mpi_em(["reconstruct", "--i", d / "odd.star", "--o", tmp_path / "o"], ranks=2, timeout=120)
    errors = _errors(r.stderr)
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert "odd.star: field rlnImageSize: box 31 px is odd" in errors[0] and "Traceback" not in r.stderr


def test_few_particles_adapt_the_defaults(data, tmp_path):
    """12 particles: refine3d's --folds default shrinks (no error naming an option the user did not pass); a
    reference with voxel size 0 is a warning. class2d on 5 particles: K = 10 (the default) is clamped to 5
    with a warning, never a word about --folds; class3d with --K 4 on 3 particles writes no all-zero map."""
    with mrcfile.new(tmp_path / "ref0.mrc") as m:
        m.set_data(mrcfile.read(data / "start.mrc"))
        m.voxel_size = 0.0
    star = _subset(data, tmp_path, slice(0, 12), None, "twelve.star", "particles_unaligned.star")
    r = mpi_em(_refine_args(star.parent, tmp_path / "r", star="twelve.star", ref=tmp_path / "ref0.mrc")
               + ["--iter", 1], ranks=0, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--folds" not in r.stderr and "voxel_size: 0 Å in the header" in r.stderr
    assert json.load(open(tmp_path / "r" / "checkpoint.json"))["args"]["folds"] == 3
    star = _subset(data, tmp_path, slice(0, 5), None, "five.star", "particles_unaligned.star")
    r = mpi_em(["class2d", "--i", star, "--o", tmp_path / "c2", "--iter", 1], ranks=0, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--folds" not in r.stderr and "K = 10 classes is more than the 5 particles" in r.stderr
    assert mrcfile.read(tmp_path / "c2" / "run_it001_classes.mrcs").shape[0] == 5
    star = _subset(data, tmp_path, slice(0, 3), None, "three.star", "particles_unaligned.star")
    r = mpi_em(["class3d", "--i", star, "--ref", data / "start.mrc", "--ini-high", 32, "--K", 4, "--iter", 1,
                "--healpix-order", 1, "--o", tmp_path / "c3"], ranks=0, timeout=120)
    assert r.returncode == 0 and "using K = 3" in r.stderr, r.stderr
    for k in range(1, 4):
        assert np.abs(mrcfile.read(tmp_path / "c3" / f"run_it001_class{k:03d}.mrc")).max() > 0, k


def test_absurd_defocus_is_a_warning(data, tmp_path):
    def negative(p):
        p.loc[p.index[:3], "rlnDefocusU"] = -2000.0

    star = _subset(data, tmp_path, slice(None), negative, "neg.star")
    r = mpi_em(["reconstruct", "--i", star, "--o", tmp_path / "o"], ranks=0, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "field rlnDefocusU: 3 particle(s) with a defocus below 0" in r.stderr


def test_error_messages_are_picklable_subclasses():
    """Every MpiEmError subclass in the package pickles (a new subclass with extra __init__ arguments must
    define __reduce__)."""
    import mpi_em.distributed  # noqa: F401 - defines RankFailed

    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)

    for cls in subclasses(MpiEmError):
        assert "__reduce__" in vars(cls) or cls.__init__ is MpiEmError.__init__, cls


def test_run_log_on_a_full_disk_warns_once(tmp_path, capsys):
    """run.log that cannot be written: one warning on stderr, then silence (no '--- Logging error ---' per line)."""
    import errno
    import logging

    from mpi_em import cli

    class Full:
        def write(self, _):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    h = cli._RunLog(tmp_path / "run.log")
    h.stream.close()
    h.stream = Full()
    rec = logging.LogRecord("mpi_em", logging.INFO, __file__, 0, "iteration %d", (1,), None)
    for _ in range(3):
        h.emit(rec)
    err = capsys.readouterr().err
    assert err.count("mpi-em: warning: cannot write") == 1 and "No space left on device" in err
    assert "Logging error" not in err and "Traceback" not in err


def test_quiet_keeps_the_run_log(small_dataset, tmp_path):
    """--quiet ("only warnings and errors on the console"): the console has no progress lines, run.log has all of
    them, as without --quiet (it had none: the logger itself was set to warnings)."""
    out = {}
    for name, extra in (("loud", []), ("quiet", ["--quiet"])):
        r = mpi_em(extra + ["reconstruct", "--i", small_dataset / "particles.star", "--o", tmp_path / name], ranks=1)
        assert r.returncode == 0, r.stderr
        out[name] = (r.stderr, open(tmp_path / name / "run.log").read())
    assert "resolution" in out["loud"][0] and "resolution" not in out["quiet"][0], out["quiet"][0]
    for name in ("loud", "quiet"):
        assert "resolution" in out[name][1], (name, out[name][1])
    assert len(out["quiet"][1].splitlines()) == len(out["loud"][1].splitlines())


_ONE_RANK_FAILS = """
import sys
from mpi_em import cli
from mpi_em.errors import OutputError
from mpi_em.jobs import fsc as fsc_job

def boom(args, comm):  # an error outside any agreed step, on rank 1 only; rank 0 goes on into a collective
    if comm.rank == 1:
        raise OutputError("/somewhere/x.json", "cannot write: No space left on device")
    comm.barrier()

fsc_job.run = boom
sys.exit(cli.main(["fsc", "a.mrc", "b.mrc"]))
"""


def test_an_error_on_one_rank_outside_an_agreed_step_ends_the_job(tmp_path):
    """Safety net: a rank that stops with an error its peers did not agree on (they wait in a collective) aborts
    the job with the error's exit code and one line, within seconds instead of hanging."""
    if MPIRUN is None:
        pytest.skip("no mpirun on PATH")
    t0 = time.monotonic()
    r = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-c", _ONE_RANK_FAILS], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    errors = _errors(r.stderr)
    assert r.returncode == 3, r.stderr
    assert errors == ["mpi-em: error: rank 1: /somewhere/x.json: cannot write: No space left on device"], r.stderr
    assert time.monotonic() - t0 < 60


def test_out_of_memory_is_one_line_with_the_model_and_what_lightens_the_job(tmp_path):
    """A job that runs out of memory after its check (host MemoryError, CuPy's OutOfMemoryError) ends with one
    line: what failed, the model's figure from run.json, what would lighten the job; agreed errors say the same."""
    from mpi4py import MPI

    from mpi_em.distributed import RankFailed, agree
    from mpi_em.errors import out_of_memory_line

    class OutOfMemoryError(Exception):  # CuPy's class, by name (no CuPy needed)
        pass

    (tmp_path / "run.json").write_text(json.dumps({"memory": {"peak_bytes": 22.3 * 2 ** 30, "peak_phase": "E-step"}}))
    line = out_of_memory_line(OutOfMemoryError("Out of memory allocating 8,589,934,592 bytes\n(allocated so far: "
                                               "34,359,738,368 bytes)."), str(tmp_path))
    assert "\n" not in line and line.startswith("out of memory: Out of memory allocating 8,589,934,592 bytes")
    assert "the memory model estimated 22.3 GiB per rank at the peak (E-step" in line and "--max-memory" in line
    assert out_of_memory_line(MemoryError(), None).startswith("out of memory: MemoryError. Rerun with --max-memory")
    assert out_of_memory_line(ValueError("x"), str(tmp_path)) is None
    with pytest.raises(RankFailed) as e:
        agree(MPI.COMM_SELF, MemoryError("Unable to allocate 8.00 GiB"))
    assert str(e.value).startswith("out of memory: Unable to allocate 8.00 GiB. Rerun with --max-memory"), str(e.value)
