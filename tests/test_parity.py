"""minigemma against transformers' GemmaForCausalLM on the same checkpoints.

Tolerances: max |logit difference| <= 1e-4 against transformers (float32, eager attention); cached
decode against minigemma's own full forward <= 1e-5. The logits are O(1-10), so 1e-4 absolute is
~1e-5 relative; tests/test_classic_bugs.py shows that every classic porting bug exceeds it.
"""

import numpy as np
import pytest

import minigemma
from helpers import greedy_continuation, max_diff, prompt
from hf_peer import TINY, load_peer, peer_greedy, peer_logits

ATOL = 1e-4
CACHE_ATOL = 1e-5


@pytest.mark.parametrize("storage", ["f32", "bf16"])
@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("length", [1, 7, 300])
def test_logits_match_transformers(tiny_checkpoints, name, storage, length):
    path = tiny_checkpoints[name, storage]
    ids = prompt(length)
    ref = peer_logits(load_peer(path), ids)
    ours = minigemma.load(path).forward(ids)
    assert ours.shape == ref.shape
    diff = max_diff(ours, ref)
    rel = diff / float(np.abs(ref).max())
    assert diff <= ATOL, f"{name}/{storage}/T={length}: max |dlogit| {diff:.3g} (rel {rel:.3g})"


@pytest.mark.parametrize("name", list(TINY))
def test_cached_decode_equals_full_forward(tiny_checkpoints, name):
    model = minigemma.load(tiny_checkpoints[name, "bf16"])
    ids = prompt(120, seed=1)
    full = model.forward(ids)
    cache = model.new_cache(200)
    pieces = [model.forward(ids[:50], cache), model.forward(ids[50:53], cache)]
    pieces += [model.forward(ids[i:i + 1], cache) for i in range(53, 120)]
    assert cache.length == 120
    assert max_diff(np.concatenate(pieces), full) <= CACHE_ATOL


@pytest.mark.parametrize("name", list(TINY))
def test_greedy_continuation_equals_transformers_generate(tiny_checkpoints, name):
    path = tiny_checkpoints[name, "bf16"]
    ids = prompt(9, seed=2)
    ours = greedy_continuation(minigemma.load(path), ids, 64)
    assert ours == peer_greedy(load_peer(path), ids, 64)


def test_float64_agrees_with_float32(tiny_checkpoints):
    path = tiny_checkpoints["mha", "bf16"]
    ids = prompt(40, seed=3)
    f32 = minigemma.load(path).forward(ids)
    f64 = minigemma.load(path, dtype=np.float64).forward(ids)
    assert f64.dtype == np.float64
    assert max_diff(f32, f64) <= 1e-5
    assert max_diff(f64, peer_logits(load_peer(path), ids)) <= ATOL


def test_bf16_normalizer_values():
    from minigemma.model import embedding_normalizer
    assert embedding_normalizer(2048, "bf16", np.float32) == np.float32(45.25)
    assert embedding_normalizer(3072, "bf16", np.float32) == np.float32(55.5)
    assert embedding_normalizer(2048, "exact", np.float32) == np.float32(np.sqrt(2048.0))
    assert embedding_normalizer(3072, "exact", np.float32) == np.float32(55.42562584220407)


def test_bf16_normalizer_matches_transformers_with_rounded_scale(tiny_checkpoints):
    """gqa has D = 48: sqrt(48) = 6.9282 in float32, 6.9375 in bfloat16. transformers with its
    embedding scale set to the bfloat16 value must agree with normalizer="bf16", and not with
    the default."""
    import torch
    path = tiny_checkpoints["gqa", "bf16"]
    ids = prompt(7)
    peer = load_peer(path)
    peer.model.embed_tokens.embed_scale.fill_(torch.tensor(48 ** 0.5).to(torch.bfloat16).item())
    ref = peer_logits(peer, ids)
    rounded = minigemma.load(path, normalizer="bf16")
    assert rounded.normalizer == np.float32(6.9375)
    assert max_diff(rounded.forward(ids), ref) <= ATOL
    assert max_diff(minigemma.load(path).forward(ids), ref) > ATOL
