"""minigemma at the true Gemma 2B shape against transformers, on the same 5 GB of random weights.

The checkpoint has the exact file layout of the google/gemma-2b repository (config.json, two
bfloat16 shards, the index) and is written once by `python -m minigemma.random_checkpoint` into
minigemma's cache directory (minigemma.cache.cache_dir()), then reused. transformers (float32,
eager attention) runs first, in a subprocess that saves its logits and exits; minigemma runs
afterwards in this process, so the ~10 GB float32 peer and minigemma are never in memory together;
the whole test holds the full-size lock. minigemma reads a 16-token prompt (<bos> first) in one
forward, then 4 more tokens one at a time through the KV cache on the numba decode kernels
(decode.Decoder, as generation does); transformers reads all 20 tokens in one forward.

Tolerance: max |dlogit| <= 1e-4 absolute for every one of the 20 positions, as for the tiny
configurations (transformers and the official Flax code agree to 2e-5 at this shape); the logits
are O(1-10).
Timings are printed (run with -s to see them), never asserted.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import minigemma
from minigemma.decode import Decoder
from minigemma.random_checkpoint import default_dir

from helpers import full_size_lock, max_diff, prompt, rel_diff
from peer_logits_subprocess import proc_status

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "peer_logits_subprocess.py")
ATOL = 1e-4
MAX_LOAD_RSS_GROWTH = 1 << 30  # 1 GiB; a copy of the weights would be 5 GB (bf16) or 10 GB (f32)

pytestmark = pytest.mark.slow


@pytest.fixture
def big_model_lock():
    """Hold the machine-wide lock that lets one process at a time load a 2B-shape model."""
    with full_size_lock():
        yield


def run(command, what):
    """stdout of a subprocess; its output becomes the failure message if it fails."""
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        pytest.fail(f"{what} failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def test_2b_shape_logits_match_transformers(big_model_lock, tmp_path):
    started = time.perf_counter()
    path = default_dir("2b")
    print(run([sys.executable, "-m", "minigemma.random_checkpoint", path, "--seed", "0",
               "--shape", "2b"], "generator").strip())
    ids = prompt(16 + 4, vocab=256000)  # a 16-token prompt and 4 tokens to decode
    prefix, decoded = ids[:16], ids[16:]

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
    decoder = Decoder(model)
    decoder.warm_up()
    cache = model.new_cache(len(ids))
    t = time.perf_counter()
    ours = [model.forward(prefix, cache)]
    print(f"minigemma 16-token forward {time.perf_counter() - t:.2f} s")
    for step, token in enumerate(decoded, 1):
        t = time.perf_counter()
        ours.append(decoder.step(token, cache)[None])
        print(f"minigemma decode step {step}: {time.perf_counter() - t:.3f} s")
    ours = np.concatenate(ours)

    assert ours.shape == ref.shape == (20, 256000)
    prefill, decode = max_diff(ours[:16], ref[:16]), max_diff(ours[16:], ref[16:])
    print(f"max |dlogit| prefill {prefill:.3g} (relative {rel_diff(ours[:16], ref[:16]):.3g}), "
          f"decode {decode:.3g} (relative {rel_diff(ours[16:], ref[16:]):.3g}); "
          f"max |logit| {float(np.abs(ref).max()):.3g}")
    print(f"test body {time.perf_counter() - started:.0f} s, peak RSS of this process "
          f"{proc_status('VmHWM') / 2**30:.2f} GiB")
    assert prefill <= ATOL, f"2B shape prefill: max |dlogit| {prefill:.3g} > {ATOL}"
    assert decode <= ATOL, f"2B shape decode: max |dlogit| {decode:.3g} > {ATOL}"
