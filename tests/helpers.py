"""Small helpers the test files share: seeded random prompts, the size of a difference between two
sets of logits, and the lock held while a full-size model is in memory."""

import contextlib
import time

import numpy as np

from minigemma.cache import full_size_lock as machine_wide_lock


def prompt(length, vocab=512, seed=0):
    """`length` seeded random token ids from [3, vocab), <bos> (2) first. -> int64 [T]"""
    ids = np.random.default_rng(seed).integers(3, vocab, size=length)
    ids[0] = 2  # <bos>
    return ids


def max_diff(ours, ref):
    """max |ours - ref| over every element, in float64."""
    return float(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).max())


def rel_diff(ours, ref):
    """max |ours - ref| relative to max |ref|: logits are O(1-10), so this is ~ the absolute / 10."""
    return max_diff(ours, ref) / float(np.abs(np.asarray(ref, np.float64)).max())


@contextlib.contextmanager
def full_size_lock():
    """minigemma.cache.full_size_lock() (one full-size model in memory at a time, across
    processes), printing how long the test waited for it (seen with pytest -s)."""
    started = time.perf_counter()
    with machine_wide_lock():
        print(f"\nwaited {time.perf_counter() - started:.0f} s for the full-size lock")
        yield
