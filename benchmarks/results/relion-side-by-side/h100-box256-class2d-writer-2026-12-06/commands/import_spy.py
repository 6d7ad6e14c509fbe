"""Run `mpi-em ARGS` in this process with a spy that records the stack of the first import of cupyx.linalg and
of scipy (printed at exit)."""
import atexit
import runpy
import sys
import traceback

seen = {}


class Spy:
    def find_spec(self, name, path=None, target=None):
        for key in ("cupyx.linalg", "scipy", "cupyx.scipy", "cupyx.jit", "cupyx.profiler"):
            if name == key and key not in seen:
                seen[key] = "".join(traceback.format_stack(limit=25))
        return None


sys.meta_path.insert(0, Spy())
atexit.register(lambda: [print(f"==== first import of {k}:\n{v}", file=sys.stderr) for k, v in seen.items()])
sys.argv = ["mpi-em"] + sys.argv[1:]
runpy.run_module("mpi_em", run_name="__main__")
