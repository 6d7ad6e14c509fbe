"""The pure helpers of benchmarks/relion_side_by_side.py (file names, RELION's text output, per-iteration times)."""
import importlib.util
import os
import subprocess

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "relion_side_by_side.py")
_spec = importlib.util.spec_from_file_location("relion_side_by_side", _PATH)
sbs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sbs)


def test_iteration_of():
    assert sbs.iteration_of("/x/run_it012_half1_model.star") == 12
    assert sbs.iteration_of("run_it000_data.star") == 0
    assert sbs.iteration_of("run_model.star") is None
    assert sbs.iteration_of("/a_it003_b/run_data.star") is None  # only the file's own name counts


def test_relion_text():
    assert sbs.relion_version("RELION version: 3.1.3 \nPrecision: BASE=double") == "3.1.3"
    assert sbs.relion_version("RELION version: 5.0.1-commit-abc\n") == "5.0.1-commit-abc"
    assert sbs.relion_version("nothing") is None
    h = "  --j (1) : Number of threads\n  --grad (false) : VDAM\n  --jpeg () : x\n"
    assert sbs.help_has(h, "--j") and sbs.help_has(h, "--grad")
    assert not sbs.help_has(h, "--jp") and not sbs.help_has(h, "--center_classes")
    out = (" Auto-refine: + Final resolution (without masking) is: 19.2\n"
           " Auto-refine: + Final resolution (without masking) is: 7.55\n")
    assert sbs.final_resolution_from_stdout(out) == 7.55
    assert sbs.final_resolution_from_stdout("Expectation iteration 3") is None


def test_seconds_per_iteration():
    # RELION: iteration 0's files are the set-up; iteration k's time is the gap between end times
    ends = {0: 5.0, 1: 15.0, 2: 18.0, 3: 22.0}
    assert sbs.seconds_per_iteration(ends) == {1: 10.0, 2: 3.0, 3: 4.0}
    # mpi_em: no iteration 0, the first from the job's start
    assert sbs.seconds_per_iteration({1: 7.0, 2: 9.5}, start=0.0) == {1: 7.0, 2: 2.5}
    assert sbs.seconds_per_iteration({1: 7.0, 2: 9.5}) == {2: 2.5}
    # RELION's VDAM writes its files every --grad_write_iter iterations: a gap of 10 iterations is 10 iterations' time
    assert sbs.seconds_per_iteration({0: 4.0, 10: 24.0, 20: 54.0}) == {10: 2.0, 20: 3.0}
    assert sbs.seconds_per_iteration({10: 20.0, 20: 40.0}, start=0.0) == {10: 2.0, 20: 2.0}
    # the steady rate leaves the first iteration out when there are others
    assert sbs.steady_seconds({1: 10.0, 2: 3.0, 3: 5.0, 4: 4.0}) == 4.0
    assert sbs.steady_seconds({1: 10.0}) == 10.0
    assert sbs.steady_seconds({}) is None
    assert sbs.by_order({1: 10.0, 2: 3.0, 3: 5.0, 4: 9.0}, {1: 2, 2: 2, 3: 3, 4: 3}) == {2: 3.0, 3: 7.0}


def test_table_and_ratio():
    rows = [{"job": "refine3d", "program": "mpi_em", "procs": "2 rank(s)", "wall_s": 10.0,
             "seconds_per_iteration": 1.0, "iterations": 9, "resolution": 5.25, "map_vs_truth_05": 5.3,
             "median_angular_error": 1.5, "status": "ok"},
            {"job": "refine3d", "program": "relion_refine_mpi", "procs": "3 ranks", "wall_s": 200.0,
             "seconds_per_iteration": 25.0, "iterations": 12, "resolution": 6.4, "map_vs_truth_05": None,
             "status": "timeout"},
            {"job": "class2d-vdam", "program": "relion_refine --grad", "status": "skipped: no --grad"}]
    t = sbs.table(rows)
    lines = t.splitlines()
    assert lines[0].split()[:4] == ["job", "program", "procs", "wall"]
    assert "5.30" in lines[2] and "timeout" in lines[3] and "skipped: no --grad" in lines[4]
    assert "wall ours/RELION 0.050 (RELION/ours 20.00x) [not both finished: ours ok, RELION timeout]" in t
    assert "s/it ours/RELION 0.040 (RELION/ours 25.00x)" in t
    assert "map vs truth" not in t  # RELION's map vs truth missing: no comparison printed
    assert sbs.ratio(1.0, None) is None and sbs.ratio(1.0, 0.0) is None and sbs.ratio(3.0, 2.0) == 1.5


def test_table_gives_class2d_view_grouping():
    """class2d has no map to hold against the truth: its rows give the view spread (mean angle between each
    particle's true view and its class's mean view; lower groups views better) and the classes that hold at least
    10 particles, and the ratio line compares both programs on them."""
    rows = [{"job": "class2d", "program": "mpi_em", "wall_s": 8.0, "seconds_per_iteration": 0.5, "iterations": 5,
             "view_spread": 41.25, "classes_alive": 23, "status": "ok"},
            {"job": "class2d", "program": "relion_refine_mpi", "wall_s": 80.0, "seconds_per_iteration": 20.0,
             "iterations": 5, "view_spread": 38.5, "classes_alive": 50, "status": "ok"}]
    t = sbs.table(rows)
    head = t.splitlines()[0]
    assert "views °" in head and "classes" in head
    assert "41.2" in t.splitlines()[2] and "23" in t.splitlines()[2].split()
    assert "view spread 41.2 against 38.5° (lower groups views better); classes >= 10 particles 23 against 50" in t


def test_class2d_view_grouping_from_files(tmp_path):
    """view_spread and classes_alive of a class2d data STAR against the truth: particles of one true view in one
    class and another view in another class give 0°; classes with fewer than 10 particles are not alive."""
    import sys

    import numpy as np
    import starfile

    subprocess.run([sys.executable, "-m", "mpi_em", "--quiet", "simulate", "--out", str(tmp_path / "d"), "--box",
                    "32", "--n", "24"], check=True)
    blocks = starfile.read(tmp_path / "d" / "particles.star", always_dict=True)
    p = blocks["particles"]
    p["rlnAngleRot"], p["rlnAnglePsi"] = 0.0, 0.0
    p["rlnAngleTilt"] = np.r_[np.zeros(12), np.full(12, 90.0)]       # two true views, 12 particles each
    starfile.write(blocks, tmp_path / "d" / "truth.star")
    p["rlnClassNumber"] = np.r_[np.ones(12, int), np.full(12, 2)]
    starfile.write(blocks, tmp_path / "d" / "run_it005_data.star")
    data, truth = str(tmp_path / "d" / "run_it005_data.star"), str(tmp_path / "d" / "truth.star")
    spread, alive = sbs.class2d_grouping(data, truth)
    assert spread == pytest.approx(0.0, abs=1e-6) and alive == 2
    p["rlnClassNumber"] = np.r_[np.ones(9, int), np.full(15, 2)]     # 3 of view 1 join view 2's class
    starfile.write(blocks, tmp_path / "d" / "run_it005_data.star", overwrite=True)
    spread, alive = sbs.class2d_grouping(data, truth)
    assert alive == 1 and spread > 5.0


def test_arguments():
    a = sbs.parse_args(["--relion-bin", "/usr/bin", "--out", "x", "--box", "64", "--apix", "2"])
    assert a.diameter == pytest.approx(102.4)
    assert a.jobs == ["reconstruct", "refine3d", "class3d", "class2d"]
    assert a.refine_extra == ""
    b = sbs.parse_args(["--relion-bin", "/usr/bin", "--out", "x", "--refine-extra", "--incr-size 10 --fsc-jump"])
    assert b.refine_extra == "--incr-size 10 --fsc-jump"
    with pytest.raises(SystemExit):
        sbs.parse_args(["--relion-bin", "/usr/bin", "--out", "x", "--jobs", "refine2d"])


def test_missing_programs(tmp_path):
    """The RELION programs a set of jobs needs and --relion-bin lacks, before anything runs (either of
    relion_reconstruct and its MPI twin does for the reconstructions; relion_refine_mpi for the EM jobs)."""
    jobs = ["reconstruct", "refine3d", "class2d"]
    assert sbs.missing_programs(str(tmp_path), jobs) == ["relion_reconstruct_mpi (or relion_reconstruct)",
                                                         "relion_refine_mpi"]
    exe = tmp_path / "relion_reconstruct"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert sbs.missing_programs(str(tmp_path), jobs) == ["relion_refine_mpi"]
    (tmp_path / "relion_refine_mpi").write_text("#!/bin/sh\n")  # not executable: missing still
    assert sbs.missing_programs(str(tmp_path), ["class3d"]) == ["relion_refine_mpi"]
    (tmp_path / "relion_refine_mpi").chmod(0o755)
    assert sbs.missing_programs(str(tmp_path), list(sbs.JOBS)) == []
    assert sbs.missing_programs(str(tmp_path / "nowhere"), ["reconstruct-1"]) == \
        ["relion_reconstruct (or relion_reconstruct_mpi)"]


def test_summary_keeps_the_record_without_maps(tmp_path):
    """--summary DIR: the JSON, PNG and table, and per job mpi_em's timings and log, named by the job; no map,
    no stack, no RELION output; an absent file is left out."""
    out, dst = tmp_path / "out", tmp_path / "summary"
    for p in ("side_by_side.json", "side_by_side.png", "refine3d/mpi_em/out/run_timings.json",
              "refine3d/mpi_em/out/run.log", "refine3d/mpi_em/out/run_class001.mrc", "refine3d/relion/run_data.star",
              "class2d/mpi_em/out/run.log"):
        (out / p).parent.mkdir(parents=True, exist_ok=True)
        (out / p).write_text(p)
    written = sbs.write_summary(str(out), str(dst), ["refine3d", "class2d"], "the table\n")
    assert sorted(os.listdir(dst)) == sorted(written) == [
        "mpi_em_class2d_run.log", "mpi_em_refine3d_run.log", "mpi_em_refine3d_timings.json", "side_by_side.json",
        "side_by_side.png", "side_by_side.txt"]
    assert (dst / "mpi_em_refine3d_timings.json").read_text() == "refine3d/mpi_em/out/run_timings.json"
    assert (dst / "side_by_side.txt").read_text() == "the table\n"


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an orphan waits for a reaper that may never come)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_stop_signal_ends_the_running_program_and_its_children(tmp_path):
    """SIGTERM to the benchmark while a program runs: the program's whole process group (here a shell and the two
    processes it started, as mpirun starts ranks) is ended within seconds, not left holding the machine, and that
    program is reported as stopped; a program started after the stop is not started at all."""
    import signal
    import threading
    import time

    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {tmp_path}/child\nsleep 60\n")
    script.chmod(0o755)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    sbs.STOP["signal"] = None
    try:
        sbs.stop_on_signals()
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t0 = time.time()
        r = sbs.run([str(script)], str(tmp_path / "log" / "job.log"), str(tmp_path), 120, dict(os.environ))
        took = time.time() - t0
        assert r["stopped"] and not r["timed_out"] and sbs.status_of(r) == "stopped"
        assert took < 20, took
        child = int((tmp_path / "child").read_text())
        time.sleep(0.5)
        assert not _running(r["pid"]) and not _running(child)  # the grandchild is gone with the group
        again = sbs.run(["sleep", "30"], str(tmp_path / "log" / "again.log"), str(tmp_path), 120, dict(os.environ))
        assert again["stopped"] and again["wall_s"] < 20
    finally:
        sbs.STOP["signal"] = None
        for s, h in old.items():
            signal.signal(s, h)


def test_kept_rows_of_an_earlier_run():
    """One side run alone keeps the other side's rows of the jobs it runs and every row of the jobs it does not;
    a row of a job stopped between programs (program '-') is replaced."""
    rows = [{"job": "class3d", "program": "mpi_em"}, {"job": "class3d", "program": "relion_refine_mpi"},
            {"job": "class2d", "program": "mpi_em"}, {"job": "class2d", "program": "relion_refine_mpi"},
            {"job": "reconstruct", "program": "relion_reconstruct_mpi"}, {"job": "refine3d", "program": "-"}]
    kept = sbs.kept_rows(rows, ["class3d", "reconstruct", "refine3d"], ["relion"])
    assert kept == [rows[0], rows[2], rows[3]]
    assert sbs.kept_rows(rows, ["class2d"], ["mpi_em"]) == [rows[0], rows[1], rows[3], rows[4], rows[5]]
    assert sbs.program_kind({"program": "relion_refine --grad"}) == "relion"
    assert sbs.parse_args(["--relion-bin", "x", "--out", "y"]).programs == ["mpi_em", "relion"]
    with pytest.raises(SystemExit):
        sbs.parse_args(["--relion-bin", "x", "--out", "y", "--programs", "cryosparc"])


def test_one_side_then_the_other_in_one_folder(tmp_path):
    """--programs mpi_em, then --programs relion with the same --out and --data: the second run adds RELION's row
    beside mpi_em's (kept from the first, with its command recorded under 'earlier'), and the table pairs them.
    Runs RELION's relion_reconstruct (Debian's relion package) on a tiny simulated set."""
    import json
    import shutil
    import sys

    relion = shutil.which("relion_reconstruct")
    if relion is None:
        pytest.skip("RELION's relion_reconstruct is not installed (Debian's relion package)")
    out, data = tmp_path / "out", tmp_path / "data"
    common = [sys.executable, _PATH, "--relion-bin", os.path.dirname(relion), "--box", "32", "--n", "200", "--snr",
              "1", "--apix", "3", "--ranks", "1", "--jobs", "reconstruct-1", "--out", str(out), "--data", str(data),
              "--timeout", "300"]
    for side in ("mpi_em", "relion"):
        r = subprocess.run(common + ["--programs", side], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        rec = json.load(open(out / "side_by_side.json"))
        assert [x["program"] for x in rec["rows"]] == (["mpi_em"] if side == "mpi_em" else
                                                       ["mpi_em", "relion_reconstruct"]), rec["rows"]
    assert rec["earlier"][0]["command"].endswith("--programs mpi_em") and "--programs relion" in rec["command"]
    assert all(x["status"] == "ok" and x["map_vs_truth_05"] for x in rec["rows"]), rec["rows"]
    assert "reconstruct-1: wall ours/RELION" in r.stdout, r.stdout


def test_class_extra_reaches_our_classification_only(tmp_path):
    """--class-extra's options are given to mpi-em's class3d (here '--reseed-below 0.99', which re-seeds a class
    after the first iteration: its run log says so, and the recorded command holds the option); without it, the
    default rule leaves the same run's classes alone."""
    import json
    import sys

    out, data = tmp_path / "out", tmp_path / "data"
    common = [sys.executable, _PATH, "--relion-bin", str(tmp_path), "--programs", "mpi_em", "--box", "32", "--n",
              "120", "--snr", "1", "--apix", "3", "--ranks", "1", "--jobs", "class3d", "--k3d", "2", "--iter", "2",
              "--data", str(data), "--timeout", "300"]
    logs = {}
    for name, extra in (("plain", []), ("extra", ["--class-extra", "--reseed-below 0.99"])):
        r = subprocess.run(common + ["--out", str(out / name)] + extra, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        row = json.load(open(out / name / "side_by_side.json"))["rows"][0]
        assert row["status"] == "ok" and ("--reseed-below 0.99" in row["command"]) == (name == "extra"), row
        logs[name] = (out / name / "class3d" / "mpi_em" / "out" / "run.log").read_text()
    assert "re-seeded" in logs["extra"] and "re-seeded" not in logs["plain"], logs


def test_before_after_runs_each_tree_in_abba_order(tmp_path, small_dataset):
    """benchmarks/em_before_after.py: each run imports mpi_em from its own tree (here a copy of this one whose
    timings lack the per-part seconds: its runs report none, this tree's do), in the order after, before, before,
    after; a job's own figures come from its run.log and run_timings.json."""
    import importlib.util as iu
    import json
    import shutil
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "em_before_after.py")
    spec = iu.spec_from_file_location("em_before_after", path)
    eba = iu.module_from_spec(spec)
    spec.loader.exec_module(eba)
    assert eba.order(2) == ["after", "before", "before", "after"] and eba.order(1) == ["after", "before"]
    before = tmp_path / "before"
    shutil.copytree(os.path.join(eba.ROOT, "mpi_em"), before / "mpi_em",
                    ignore=shutil.ignore_patterns("__pycache__"))
    outputs = before / "mpi_em" / "em" / "outputs.py"
    src = outputs.read_text()
    assert '**{f"seconds_{k}": float(v) for k, v in parts.items()}' in src
    outputs.write_text(src.replace('**{f"seconds_{k}": float(v) for k, v in parts.items()}',
                                   '**{f"old_{k}": float(v) for k, v in parts.items()}'))
    r = subprocess.run([sys.executable, path, "--before", str(before), "--repeats", "1", "--json",
                        str(tmp_path / "ab.json"), "--", "class2d", "--i", str(small_dataset / "particles.star"),
                        "--K", "3", "--iter", "2"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", MPI_EM_DEVICE="cpu"))
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.load(open(tmp_path / "ab.json"))
    assert [x["tree"] for x in rec["runs"]] == ["after", "before"]
    after, old = rec["runs"]
    assert after["iterations"] == old["iterations"] == 2 and after["seconds_job"] > 0 and old["seconds_job"] > 0
    assert after["estep"] > 0 and after["update"] is not None and old["estep"] is None, rec["runs"]
