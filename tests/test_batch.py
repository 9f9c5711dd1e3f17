"""Many sequences at once: a sequence decoded in a batch gets the same bits, and so the same tokens,
as decoded alone; and the batch's greedy tokens are transformers' greedy tokens.

"The same" is asserted bit for bit (assert_array_equal), for both kernel builds: each kernel gives
a token's row the same partial sums whatever tokens share the call (kernels.py), and the decode
engine runs every sequence's attention on its own cache.
"""

import os

import numpy as np
import pytest

import minigemma
from hf_peer import load_peer, peer_greedy
from minigemma import golden, kernels
from minigemma.decode import PREFILL_CHUNK, Decoder
from minigemma.golden.recording import greedy_continuations
from minigemma.quant import GGMLBlocks
from minigemma.sampling import Sampler, generate_batch, generate_batch_ids, generate_ids
from test_kernels import random_weight

from helpers import alone_and_together, prompt

BUILDS = {"fast": kernels.FAST, "exact": kernels.EXACT}
# Prompts of different lengths, so the sequences' caches differ: 1 token, short ones, and one over
# PREFILL_CHUNK (prefilled alone, in two passes).
PROMPTS = [prompt(n, seed=n).tolist() for n in (1, 9, 4, 30, PREFILL_CHUNK + 3)]


# ----------------------------------------------------------------------------------------------
# Kernels: a token's row alone and among others


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("stored", ["bf16", "f32"])
@pytest.mark.parametrize("rows,cols", [(13, 37), (517, 300), (36, 5000)])  # rows % 4, cols % 16
def test_matmul_row_of_a_token_is_the_same_in_any_batch(build, stored, rows, cols):
    rng = np.random.default_rng(rows + cols)
    w = random_weight(rng, rows, cols, stored)
    x = rng.standard_normal((9, cols), dtype=np.float32)  # two tiles of four, and one left over
    k = BUILDS[build]
    alone = np.concatenate([k.matmul(w, x[t:t + 1]) for t in range(9)])
    np.testing.assert_array_equal(k.matmul(w, x), alone)
    np.testing.assert_array_equal(k.matmul(w, x[3:8]), alone[3:8])  # other tokens beside it


@pytest.mark.parametrize("build", BUILDS)
def test_qkv_and_gate_up_rows_are_the_same_in_any_batch(build):
    rng = np.random.default_rng(8)
    w_q, w_k, w_v = (random_weight(rng, n, 100, "bf16") for n in (130, 33, 33))
    w_gate, w_up = random_weight(rng, 203, 100, "bf16"), random_weight(rng, 203, 100, "bf16")
    x = rng.standard_normal((6, 100), dtype=np.float32)
    k = BUILDS[build]
    for t in range(6):
        for batch, alone in zip(k.qkv(w_q, w_k, w_v, x), k.qkv(w_q, w_k, w_v, x[t:t + 1])):
            np.testing.assert_array_equal(batch[t:t + 1], alone)
        for batch, alone in zip(k.gate_and_up(w_gate, w_up, x),
                                k.gate_and_up(w_gate, w_up, x[t:t + 1])):
            np.testing.assert_array_equal(batch[t:t + 1], alone)


# ----------------------------------------------------------------------------------------------
# The decode engine


@pytest.mark.parametrize("name", ["mqa", "mha", "gqa"])
@pytest.mark.parametrize("reproducible", [False, True])
def test_prefill_and_steps_of_a_batch_are_the_bits_of_each_sequence_alone(tiny_checkpoints, name,
                                                                           reproducible):
    model = minigemma.load(tiny_checkpoints[name, "bf16"])
    decoder = Decoder(model, reproducible)
    continuations = [[7, 8, 9], [500, 3, 3], [42, 41, 40], [2, 2, 2], [100, 200, 300]]
    alone, together = alone_and_together(model, decoder, PROMPTS, continuations)
    np.testing.assert_array_equal(together, alone)


def test_quantized_weights_in_a_batch_give_each_sequence_its_bits_alone(tiny_checkpoints):
    """GGUF Q8_0 blocks: a batch multiplies each block's weights into four tokens at a time
    (quant_kernels' four-token kernels), a sequence alone one at a time; same bits."""
    gguf = pytest.importorskip("gguf")
    model = minigemma.load(tiny_checkpoints["mqa", "f32"])
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    for name, w in model.weights.items():
        if w.ndim == 2:  # every matrix, the embedding too, as llama.cpp's Q8_0 files store it
            model.weights[name] = GGMLBlocks(gguf.quants.quantize(w, q8_0), q8_0)
    decoder = Decoder(model)
    assert decoder.on_kernels
    alone, together = alone_and_together(model, decoder, PROMPTS[:4], [[5, 6]] * 4)
    np.testing.assert_array_equal(together, alone)


# ----------------------------------------------------------------------------------------------
# Generation


def one_by_one(model, prompts, samplers, n, stop_ids=(), max_len=None, stops=None):
    """generate_ids for each prompt alone; `stops` (a list) receives each one's stop reason."""
    decoder, out = Decoder(model), []
    for p, sampler in zip(prompts, samplers):
        stats = {}
        cache = model.new_cache(max_len or len(p) + n)
        out.append(list(generate_ids(decoder, p, sampler, cache=cache, max_new_tokens=n,
                                     stop_ids=stop_ids, stats=stats)))
        if stops is not None:
            stops.append(stats["stop"])
    return out


def together(model, prompts, samplers, n, stop_ids=(), max_len=None, stats=None):
    caches = [model.new_cache(max_len or len(p) + n) for p in prompts]
    return generate_batch_ids(Decoder(model), prompts, samplers, caches=caches, max_new_tokens=n,
                              stop_ids=stop_ids, stats=stats)


@pytest.mark.parametrize("name", ["mqa", "gqa"])
def test_greedy_batch_equals_each_prompt_alone_and_transformers(tiny_checkpoints, name):
    path = tiny_checkpoints[name, "bf16"]
    model = minigemma.load(path)
    stats = {}
    batch = together(model, PROMPTS, [Sampler() for _ in PROMPTS], 24, stats=stats)
    assert batch == one_by_one(model, PROMPTS, [Sampler() for _ in PROMPTS], 24)
    peer = load_peer(path)
    for p in PROMPTS[1:3]:  # a couple, against transformers' generate(do_sample=False)
        assert batch[PROMPTS.index(p)] == peer_greedy(peer, p, 24)
    assert stats["sequences"] == 5 and stats["new_tokens"] == 5 * 24
    assert stats["decode_steps"] == 23 and stats["stops"] == ["max_new_tokens"] * 5


def test_seeded_sampling_batch_equals_each_prompt_alone(tiny_checkpoints):
    model = minigemma.load(tiny_checkpoints["mha", "bf16"])
    settings = dict(temperature=1.0, top_k=50, top_p=0.9)
    samplers = lambda: [Sampler(**settings, seed=10 + b) for b in range(len(PROMPTS))]
    batch = together(model, PROMPTS, samplers(), 32)
    assert batch == one_by_one(model, PROMPTS, samplers(), 32)
    same_prompt = [PROMPTS[1]] * 3  # n samples of one prompt: one stream of draws each
    samples = together(model, same_prompt, samplers()[:3], 32)
    assert samples == one_by_one(model, same_prompt, samplers()[:3], 32)
    assert len({tuple(s) for s in samples}) == 3


def test_each_sequence_stops_as_it_would_alone(tiny_checkpoints):
    """A stop token ends one sequence while the others go on; a full context ends another."""
    model = minigemma.load(tiny_checkpoints["mqa", "bf16"])
    free = one_by_one(model, PROMPTS[:3], [Sampler() for _ in range(3)], 12)
    stop, stops = (free[0][4],), []
    with pytest.warns(UserWarning, match="context is full"):
        expected = one_by_one(model, PROMPTS[:3], [Sampler() for _ in range(3)], 12, stop,
                              max_len=16, stops=stops)
    assert stops[0] == "stop token" and stops[1] == "context full"  # 9 prompt tokens + 7 = 16
    stats = {}
    with pytest.warns(UserWarning, match="sequence 1: generation stopped after 7 new tokens"):
        batch = together(model, PROMPTS[:3], [Sampler() for _ in range(3)], 12, stop, max_len=16,
                         stats=stats)
    assert batch == expected and stats["stops"] == stops


TOKENIZER = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "tiny-gemma",
                         "tokenizer.model")


def test_generate_batch_texts_are_generate_with_seed_plus_index(tiny_checkpoints):
    model = minigemma.load(tiny_checkpoints["gqa", "bf16"])
    tokenizer = minigemma.Tokenizer(TOKENIZER)
    prompts = ["Once upon a time", "The cat", "Once upon a time"]
    options = dict(max_new_tokens=20, temperature=0.8, top_p=0.95)
    texts = generate_batch(model, tokenizer, prompts, seed=7, **options)
    assert texts == [minigemma.generate(model, tokenizer, p, seed=7 + b, **options)
                     for b, p in enumerate(prompts)]
    greedy = generate_batch(model, tokenizer, prompts, max_new_tokens=20, stop=())
    assert greedy[0] == greedy[2] == minigemma.generate(model, tokenizer, prompts[0],
                                                        max_new_tokens=20, stop=())


@pytest.mark.parametrize("prompts", [[], "one text", ["fine", ""]])
def test_generate_batch_rejects_bad_prompts(tiny_checkpoints, prompts):
    model = minigemma.load(tiny_checkpoints["gqa", "bf16"])
    with pytest.raises(ValueError, match="prompt"):
        generate_batch(model, minigemma.Tokenizer(TOKENIZER), prompts)


# ----------------------------------------------------------------------------------------------
# Goldens record their greedy continuations in batches


def test_golden_greedy_continuations_together_equal_each_alone(tiny_checkpoints):
    model = minigemma.load(tiny_checkpoints["mha", "bf16"])
    decoder = Decoder(model, reproducible=True)  # what `golden record` uses
    counts = [5, 0, 12, 1, 7]

    def prefilled():
        caches = [model.new_cache(len(p) + n) for p, n in zip(PROMPTS, counts)]
        return caches, [model.forward(p, c, last_only=True)[0] for p, c in zip(PROMPTS, caches)]

    caches, logits = prefilled()
    batch = greedy_continuations(decoder, logits, caches, counts)
    caches, logits = prefilled()
    alone = [greedy_continuations(decoder, [row], [c], [n])[0]
             for row, c, n in zip(logits, caches, counts)]
    assert [list(t) for t in batch] == [list(t) for t in alone]
    assert [len(t) for t in batch] == counts
    assert golden.recording.GREEDY_BATCH > 1
