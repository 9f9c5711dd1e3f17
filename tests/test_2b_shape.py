"""minigemma at the true Gemma 2B shape against transformers, on the same 5 GB of random weights.

The checkpoint has the exact file layout of the google/gemma-2b repository (config.json, two
bfloat16 shards, the index) and is written once by scripts/make_2b_shape_checkpoint.py into
$MINIGEMMA_CACHE or ~/.cache/minigemma, then reused. transformers (float32, eager attention) runs
first, in a subprocess that saves its logits and exits; minigemma runs afterwards in this process,
so the ~10 GB float32 peer and minigemma are never in memory together. minigemma reads a 16-token
prompt (<bos> first) in one forward, then 4 more tokens one at a time through the KV cache (the
numba decode kernels); transformers reads all 20 tokens in one forward.

Tolerance: max |dlogit| <= 1e-4 absolute for every one of the 20 positions, as for the tiny
configurations (transformers and the official Flax code agree to 2e-5 at this shape); the logits
are O(1-10).
Timings are printed (run with -s to see them), never asserted.
"""

import fcntl
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import minigemma

HERE = os.path.dirname(os.path.abspath(__file__))
GENERATOR = os.path.join(HERE, os.pardir, "scripts", "make_2b_shape_checkpoint.py")
PEER = os.path.join(HERE, "peer_logits_subprocess.py")
LOCK = "/tmp/minigemma-2b.lock"
ATOL = 1e-4
MAX_LOAD_RSS_GROWTH = 1 << 30  # 1 GiB; a copy of the weights would be 5 GB (bf16) or 10 GB (f32)

sys.path.insert(0, os.path.dirname(GENERATOR))
from make_2b_shape_checkpoint import default_dir  # noqa: E402
from peer_logits_subprocess import proc_status  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def big_model_lock():
    """Hold the machine-wide lock that lets one process at a time load a 2B-shape model."""
    with open(LOCK, "a") as f:
        started = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        print(f"\nwaited {time.perf_counter() - started:.0f} s for {LOCK}")
        yield


def run(command, what):
    """stdout of a subprocess; its output becomes the failure message if it fails."""
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        pytest.fail(f"{what} failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def token_ids(length, seed=0):
    """`length` seeded random token ids, <bos> first: a 16-token prompt and 4 tokens to decode."""
    ids = np.random.default_rng(seed).integers(3, 256000, size=length)
    ids[0] = 2  # <bos>
    return ids


def max_diff(ours, ref):
    """(max |ours - ref|, the same relative to max |ref|)"""
    diff = float(np.abs(ours.astype(np.float64) - ref).max())
    return diff, diff / float(np.abs(ref).max())


def test_2b_shape_logits_match_transformers(big_model_lock, tmp_path):
    started = time.perf_counter()
    path = default_dir("2b")
    print(run([sys.executable, GENERATOR, path, "--seed", "0", "--shape", "2b"], "generator").strip())
    ids = token_ids(16 + 4)
    prompt, decoded = ids[:16], ids[16:]

    # 1. transformers, in a process of its own: logits of all 20 tokens in one forward.
    peer_file = str(tmp_path / "peer_logits.npy")
    peer = json.loads(run([sys.executable, PEER, path, peer_file, *map(str, ids)],
                          "transformers peer").splitlines()[-1])
    ref = np.load(peer_file)
    print(f"transformers float32: load {peer['load_s']:.1f} s, 20-token forward "
          f"{peer['forward_s']:.2f} s, peak RSS {peer['VmHWM'] / 2**30:.2f} GiB (at exit "
          f"{peer['RssAnon'] / 2**30:.2f} GiB own memory + {peer['RssFile'] / 2**30:.2f} GiB "
          f"mapped file pages)")

    # 2. minigemma: loading maps the files; VmRSS counts only the mapped pages that were touched.
    before = proc_status("VmRSS")
    t = time.perf_counter()
    model = minigemma.load(path)
    load_s = time.perf_counter() - t
    growth = proc_status("VmRSS") - before
    size = sum(w.nbytes for w in model.weights.values())
    print(f"minigemma load {load_s:.2f} s, RSS growth {growth / 2**20:.1f} MiB "
          f"(weights {size / 2**30:.2f} GiB)")
    assert growth < MAX_LOAD_RSS_GROWTH, \
        f"load grew resident memory by {growth / 2**30:.2f} GiB: the weights were copied"
    c = model.config
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) == \
        (256000, 2048, 18, 8, 1, 256, 16384)

    # 3. The 16-token prompt in one forward (prefill), then 4 tokens one at a time (decode).
    cache = model.new_cache(len(ids))
    t = time.perf_counter()
    ours = [model.forward(prompt, cache)]
    print(f"minigemma 16-token forward {time.perf_counter() - t:.2f} s")
    for step, token in enumerate(decoded, 1):
        t = time.perf_counter()
        ours.append(model.forward([token], cache))
        print(f"minigemma decode step {step}: {time.perf_counter() - t:.3f} s")
    ours = np.concatenate(ours)

    assert ours.shape == ref.shape == (20, 256000)
    prefill, decode = max_diff(ours[:16], ref[:16]), max_diff(ours[16:], ref[16:])
    print(f"max |dlogit| prefill {prefill[0]:.3g} (relative {prefill[1]:.3g}), decode "
          f"{decode[0]:.3g} (relative {decode[1]:.3g}); max |logit| {float(np.abs(ref).max()):.3g}")
    print(f"test body {time.perf_counter() - started:.0f} s, peak RSS of this process "
          f"{proc_status('VmHWM') / 2**30:.2f} GiB")
    assert prefill[0] <= ATOL, f"2B shape prefill: max |dlogit| {prefill[0]:.3g} > {ATOL}"
    assert decode[0] <= ATOL, f"2B shape decode: max |dlogit| {decode[0]:.3g} > {ATOL}"
