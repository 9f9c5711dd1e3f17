"""Sampling and generation: the filters against plain reference code and against transformers'
logits warpers, seeded determinism, stops, argument checks, and greedy generation against
transformers' generate(do_sample=False).

Tolerances: filtered distributions agree with transformers' warpers (run in float64 on the same
logits) on exactly the same kept tokens and within 1e-12 per probability; greedy tokens are
identical.
"""

import dataclasses
import math

import numba
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import helpers
import minigemma
from hf_peer import TINY, load_peer, peer_greedy
from minigemma.decode import Decoder
from minigemma.model import Gemma
from minigemma.sampling import (Sampler, check_sampling, draw, filtered_probs, generate_ids,
                                sample_token, softmax64, top_k_mask, top_p_mask)


def random_logits(seed, V=200, scale=3.0, ties=False):
    logits = np.random.default_rng(seed).standard_normal(V) * scale
    return np.round(logits) if ties else logits  # rounding to integers makes many ties


# ----------------------------------------------------------------------------------------------
# The masks against the definitions written out token by token


def reference_top_k(logits, k):
    """Keep a token when fewer than k tokens have a strictly higher logit."""
    return np.array([sum(other > x for other in logits) < k for x in logits])


def reference_top_p(probs, p):
    """Keep a token when the tokens strictly more probable than it hold less than p."""
    return np.array([math.fsum(q for q in probs if q > x) < p for x in probs])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 2, 7, 50, 200, 1000])
def test_top_k_mask_matches_reference(k, ties):
    for seed in range(5):
        logits = random_logits(seed, ties=ties)
        mask = top_k_mask(logits, k)
        np.testing.assert_array_equal(mask, reference_top_k(logits, k))
        assert mask.sum() >= min(k, len(logits))


def test_top_k_keeps_every_tie_at_the_boundary():
    logits = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 0.0])
    np.testing.assert_array_equal(top_k_mask(logits, 1), [0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(top_k_mask(logits, 3), [0, 1, 1, 1, 1, 0])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p", [1e-9, 0.1, 0.5, 0.9, 0.99])
def test_top_p_mask_matches_reference(p, ties):
    for seed in range(5):
        probs = softmax64(random_logits(seed, ties=ties))
        mask = top_p_mask(probs, p)
        np.testing.assert_array_equal(mask, reference_top_p(probs, p))
        assert probs[mask].sum() >= p or mask.all()
        assert mask[np.argmax(probs)]


def test_top_p_keeps_tied_tokens_together():
    probs = np.array([0.1, 0.3, 0.3, 0.2, 0.1])
    np.testing.assert_array_equal(top_p_mask(probs, 0.2), [0, 1, 1, 0, 0])  # the tie at the top
    np.testing.assert_array_equal(top_p_mask(probs, 0.85), [1, 1, 1, 1, 1])  # the tie at the end


def test_top_p_of_one_keeps_every_token_even_negligible_ones():
    probs = softmax64(np.array([0.0, -700.0, 5.0, -30.0]))  # 1e-300 survives the softmax
    assert top_p_mask(probs, 1.0).all()
    assert not reference_top_p(probs, 1.0).all()  # why p = 1 is special-cased: 1 - tiny == 1


def test_top_k_one_is_greedy_at_any_temperature():
    for seed in range(20):
        logits = random_logits(seed)
        rng = np.random.default_rng(seed)
        for temperature in (0.5, 1.0, 5.0):
            assert sample_token(logits, temperature, 1, None, rng) == np.argmax(logits)


def test_temperature_towards_zero_becomes_greedy():
    for seed in range(20):
        logits = random_logits(seed)
        top2 = np.sort(logits)[-2:]
        temperature = (top2[1] - top2[0]) / 800  # the runner-up weighs exp(-800) = 0
        probs = filtered_probs(logits, temperature)
        assert probs[np.argmax(logits)] == 1.0
        assert sample_token(logits, temperature, None, None, np.random.default_rng(seed)) \
            == np.argmax(logits)


def test_greedy_takes_the_lowest_id_on_a_tie():
    assert sample_token(np.array([0.0, 2.0, 1.0, 2.0]), 0.0, None, None, None) == 1


# ----------------------------------------------------------------------------------------------
# The distribution drawn from, against transformers' warpers in the same order


def transformers_probs(logits, temperature, top_k, top_p):
    """transformers' generate(do_sample=True) chain (temperature, top-k, top-p), in float64."""
    scores = torch.tensor(logits, dtype=torch.float64)[None]
    warpers = [TemperatureLogitsWarper(float(temperature))]
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    for warper in warpers:
        scores = warper(None, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


def assert_same_distribution(ours, ref):
    np.testing.assert_array_equal(ours > 0, ref > 0)  # the same tokens kept
    assert np.abs(ours - ref).max() <= 1e-12
    assert abs(ours.sum() - 1) <= 1e-12


@pytest.mark.parametrize("top_p", [None, 0.05, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("top_k", [None, 1, 5, 40])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_filtered_distribution_matches_transformers(temperature, top_k, top_p):
    for seed in range(4):
        logits = random_logits(seed, V=512)
        assert_same_distribution(filtered_probs(logits, temperature, top_k, top_p),
                                 transformers_probs(logits, temperature, top_k, top_p))


def test_filtered_distribution_matches_transformers_on_model_logits(tiny_checkpoints):
    """Along a sampled generation of a real (tiny) model, every step's distribution agrees."""
    model = minigemma.load(tiny_checkpoints["mqa", "bf16"])
    sampler = Sampler(0.8, top_k=50, top_p=0.9, seed=0)
    cache = model.new_cache(40)
    logits = model.forward(np.arange(2, 10), cache, last_only=True)
    for _ in range(30):
        ours = filtered_probs(logits[-1], 0.8, 50, 0.9)
        assert_same_distribution(ours, transformers_probs(logits[-1].astype(np.float64), 0.8, 50,
                                                          0.9))
        logits = model.forward([sampler(logits[-1])], cache)


# ----------------------------------------------------------------------------------------------
# Drawing


def test_draw_is_the_inverse_cdf_in_id_order():
    probs = np.array([0.25, 0.0, 0.5, 0.25])
    uniforms = (0.0, 0.2499, 0.25, 0.7499, 0.75, 0.999999)
    assert [draw(probs, u) for u in uniforms] == [0, 0, 2, 2, 3, 3]
    assert draw(probs, np.nextafter(1.0, 0.0)) == 3


def test_draws_follow_the_distribution():
    """20000 seeded draws: each token's count within 5 standard deviations of its expectation."""
    probs = filtered_probs(random_logits(0, V=30), 1.0, top_k=12)
    rng = np.random.default_rng(7)
    n = 20000
    counts = np.bincount([draw(probs, rng.random()) for _ in range(n)], minlength=len(probs))
    sigma = np.sqrt(n * probs * (1 - probs))
    assert np.all(np.abs(counts - n * probs) <= 5 * sigma + 1e-9)
    assert np.all(counts[probs == 0] == 0)


# ----------------------------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="1"), "temperature"), (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-1), "top_p"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
])
def test_bad_sampling_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        check_sampling(**kwargs)
    with pytest.raises(ValueError, match=name):
        Sampler(**kwargs)


# ----------------------------------------------------------------------------------------------
# Generation through the model


def prompt(length=9):
    return helpers.prompt(length, seed=2).tolist()


def run(model, ids, sampler, n, stop_ids=(), max_len=None, stats=None):
    cache = model.new_cache(max_len or len(ids) + n)
    return list(generate_ids(Decoder(model), ids, sampler, cache=cache, max_new_tokens=n,
                             stop_ids=stop_ids, stats=stats))


@pytest.mark.parametrize("name", list(TINY))
def test_greedy_generation_equals_transformers_generate(tiny_checkpoints, name):
    path = tiny_checkpoints[name, "bf16"]
    ids = prompt()
    stats = {}
    ours = run(minigemma.load(path), ids, Sampler(), 64, stats=stats)
    assert ours == peer_greedy(load_peer(path), ids, 64)
    assert stats["new_tokens"] == 64 and stats["decode_steps"] == 63
    assert stats["prompt_tokens"] == len(ids) and stats["stop"] == "max_new_tokens"


def test_seed_reproduces_the_generation(tiny_checkpoints):
    model = minigemma.load(tiny_checkpoints["gqa", "bf16"])
    settings = dict(temperature=1.0, top_k=100, top_p=0.95)
    first = run(model, prompt(), Sampler(**settings, seed=123), 48)
    assert run(model, prompt(), Sampler(**settings, seed=123), 48) == first
    assert run(model, prompt(), Sampler(**settings, seed=124), 48) != first


def test_seed_gives_the_same_tokens_with_any_thread_count(tiny_checkpoints):
    model = minigemma.load(tiny_checkpoints["mqa", "bf16"])
    before = numba.get_num_threads()
    tokens = {}
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            tokens[threads] = run(model, prompt(), Sampler(1.0, seed=5), 48)
    finally:
        numba.set_num_threads(before)
    assert len(tokens) > 1, "needs numba with at least 2 threads to compare"
    assert len(set(map(tuple, tokens.values()))) == 1


def test_stop_token_ends_generation_and_is_not_returned(tiny_checkpoints):
    model = minigemma.load(tiny_checkpoints["mqa", "bf16"])
    free = run(model, prompt(), Sampler(), 20)
    stop = free[6]
    first = free.index(stop)
    stats = {}
    assert run(model, prompt(), Sampler(), 20, stop_ids=(stop, 511), stats=stats) == free[:first]
    assert stats["stop"] == "stop token" and stats["new_tokens"] == first


def test_generation_stops_with_a_warning_when_the_context_is_full(tiny_checkpoints):
    model = minigemma.load(tiny_checkpoints["mqa", "bf16"])
    free = run(model, prompt(), Sampler(), 20)
    stats = {}
    with pytest.warns(UserWarning, match="context is full"):
        assert run(model, prompt(), Sampler(), 20, max_len=12, stats=stats) == free[:3]
    assert stats["stop"] == "context full"


def test_a_prompt_longer_than_the_context_is_a_clear_error(tiny_checkpoints):
    model = minigemma.load(tiny_checkpoints["mqa", "bf16"])
    # generate_ids trusts its caller (stream and Chat check first); the forward still refuses
    with pytest.raises(ValueError, match=r"10 new tokens after 0 cached positions exceed the "
                                         r"cache's max_len \(8\)"):
        run(model, prompt(10), Sampler(), 5, max_len=8)


# ----------------------------------------------------------------------------------------------
# Text: generate / stream with the tiny Gemma-layout tokenizer (512 pieces, like the checkpoints)

TOKENIZER = "examples/tiny-gemma/tokenizer.model"


@pytest.fixture(scope="module")
def tokenizer():
    import os
    return minigemma.Tokenizer(os.path.join(os.path.dirname(__file__), os.pardir, TOKENIZER))


def test_generate_text_equals_transformers_greedy_decoded(tiny_checkpoints, tokenizer):
    path = tiny_checkpoints["gqa", "bf16"]
    model = minigemma.load(path)
    text = "Once upon a time"
    expected = tokenizer.decode(peer_greedy(load_peer(path), tokenizer.encode(text), 40))
    assert minigemma.generate(model, tokenizer, text, max_new_tokens=40, stop=()) == expected
    pieces = list(minigemma.stream(model, tokenizer, text, max_new_tokens=40, stop=()))
    assert len(pieces) > 1 and "".join(pieces) == expected


class Scripted(Gemma):
    """The tiny model with its logits replaced: it 'chooses' the tokens of a script in turn.
    (In float64, so that the decode engine runs this forward for every token, not its kernels.)"""

    def __init__(self, model, script):
        super().__init__(model.config, model.weights, np.float64)
        self.script = iter(script)

    def forward(self, token_ids, cache, last_only=False):
        super().forward(token_ids, cache, last_only=True)
        logits = np.zeros((1, self.config.vocab_size), np.float32)
        logits[0, next(self.script)] = 1.0
        return logits


@pytest.mark.parametrize("stop_token", ["eos_id", "end_of_turn_id"])
def test_stream_stops_on_eos_and_end_of_turn(tiny_checkpoints, tokenizer, stop_token):
    model = minigemma.load(tiny_checkpoints["mqa", "bf16"])
    words = tokenizer.encode(" the model", bos=False)
    script = words + [getattr(tokenizer, stop_token)] + words
    stats = {}
    text = minigemma.generate(Scripted(model, script), tokenizer, "Hi", stats=stats)
    assert text == " the model" and stats["stop"] == "stop token"
    everything = minigemma.generate(Scripted(model, script), tokenizer, "Hi", stop=(),
                                    max_new_tokens=len(script))
    assert everything == tokenizer.decode(script)


def test_stream_stops_at_the_models_max_positions(tiny_checkpoints, tokenizer):
    loaded = minigemma.load(tiny_checkpoints["mqa", "bf16"])
    model = Gemma(dataclasses.replace(loaded.config, max_positions=16), loaded.weights)
    ids = prompt(10)
    stats = {}
    full = r"after 6 new tokens: the context is full \(16 positions\)"
    with pytest.warns(UserWarning, match=full):
        minigemma.generate(model, tokenizer, ids, max_new_tokens=20, stop=(), stats=stats)
    assert stats["new_tokens"] == 6 and stats["stop"] == "context full"
    with pytest.raises(ValueError, match="17 tokens do not fit in the context of 16 positions"):
        minigemma.stream(model, tokenizer, prompt(17))


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(prompt=""), "prompt is empty"),
    (dict(prompt=[]), "no token ids"),
])
def test_stream_checks_arguments_before_running(tiny_checkpoints, tokenizer, kwargs, message):
    model = minigemma.load(tiny_checkpoints["mqa", "bf16"])
    kwargs = {"prompt": "Hello", **kwargs}
    with pytest.raises(ValueError, match=message):
        minigemma.stream(model, tokenizer, **kwargs)  # raised on the call, not on iteration


def test_a_tokenizer_for_another_vocabulary_is_refused(tiny_checkpoints, tokenizer):
    loaded = minigemma.load(tiny_checkpoints["mqa", "bf16"])
    model = Gemma(dataclasses.replace(loaded.config, vocab_size=600), loaded.weights)
    with pytest.raises(ValueError, match="tokenizer has 512 pieces but the checkpoint's embedding "
                                         "has 600 token rows"):
        minigemma.generate(model, tokenizer, "Hello")
