"""The D7 and relion_project jobs of tests/test_initial_model.py at another --healpix-order / --seed (order 0:
the final passes at order 1 by the new default)."""
import sys, tempfile, traceback
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[5] / "tests"))  # the repository's tests/
import test_initial_model as T

order, seed, which = sys.argv[1], sys.argv[2], sys.argv[3]
orig = T.mpi_em
def patched(argv, **kw):
    argv = list(argv)
    if argv and argv[0] == "initial-model":
        i = argv.index("--healpix-order"); argv[i + 1] = order
        if "--seed" in argv: argv[argv.index("--seed") + 1] = seed
        else: argv += ["--seed", seed]
        if order == "1": argv += ["--final-healpix-order", "1"]
        print("ARGV", " ".join(map(str, argv)), flush=True)
    return orig(argv, **kw)
T.mpi_em = patched
fn = {"d7": T.test_symmetry_found_and_applied, "relion": T.test_particles_projected_by_relion}[which]
with tempfile.TemporaryDirectory() as d:
    try:
        fn(Path(d)); print("PASS")
    except AssertionError as e:
        print("FAIL", e)
