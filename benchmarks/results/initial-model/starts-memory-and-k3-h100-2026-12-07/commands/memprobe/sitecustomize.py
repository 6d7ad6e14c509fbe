"""Study-only probe: CuPy's default memory pool sampled every 50 ms in a thread; at exit the peaks of its held
(total) and used bytes appended to $MEMPROBE_OUT."""
import atexit
import os
import sys
import threading
import time

_out = os.environ.get("MEMPROBE_OUT")
if _out:
    _peak = {"total": 0, "used": 0, "t": 0.0}
    _t0 = time.time()
    _stop = threading.Event()

    def _loop():
        pool = None
        while not _stop.is_set():
            cp = sys.modules.get("cupy")
            if cp is not None and pool is None and hasattr(cp, "get_default_memory_pool"):
                try:
                    pool = cp.get_default_memory_pool()
                except Exception:
                    pool = None
            if pool is not None:
                try:
                    t, u = pool.total_bytes(), pool.used_bytes()
                    if t > _peak["total"]:
                        _peak["total"], _peak["t"] = t, time.time() - _t0
                    _peak["used"] = max(_peak["used"], u)
                except Exception:
                    pass
            _stop.wait(0.05)

    _th = threading.Thread(target=_loop, daemon=True)
    _th.start()

    def _dump():
        _stop.set()
        _th.join(1.0)
        with open(_out, "a") as f:
            f.write(f"{os.getpid()} {' '.join(sys.argv[:3])}: pool held peak {_peak['total'] / 2**30:.3f} GiB at "
                    f"{_peak['t']:.1f} s, used peak {_peak['used'] / 2**30:.3f} GiB\n")

    atexit.register(_dump)
