"""minigemma's cache directory, and the lock that keeps one full-size model in memory at a time.

The generated 2B/7B-shape checkpoints (random_checkpoint.py) live in the cache directory, outside
any source tree. A full-size model takes 5-40 GB of memory, so the benchmark, the slow tests and
anything else that loads one hold `full_size_lock()` meanwhile: processes that want one at the
same time take turns instead of running the machine out of memory.
"""

import contextlib
import fcntl
import os


def cache_dir():
    """$MINIGEMMA_CACHE, else $XDG_CACHE_HOME/minigemma, else ~/.cache/minigemma."""
    if os.environ.get("MINIGEMMA_CACHE"):
        return os.path.expanduser(os.environ["MINIGEMMA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(os.path.expanduser(base), "minigemma")


@contextlib.contextmanager
def full_size_lock():
    """Hold the machine-wide lock cache_dir()/full-size.lock (an exclusive fcntl.flock) while the
    block runs. The kernel releases it when the file closes, so a killed process never leaves it
    held."""
    os.makedirs(cache_dir(), exist_ok=True)
    with open(os.path.join(cache_dir(), "full-size.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
