"""The decode engine (decode.py) against the reference forward (model.py): steps token by token,
several sequences per step, prompts prefilled on the kernels, and the thread-count policy."""

import numba
import numpy as np
import pytest

from minigemma import kernels, load
from minigemma.decode import PREFILL_CHUNK, Decoder, ThreadCount
from minigemma.model import Gemma

from helpers import prompt

needs_two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                                       reason="needs 2 numba threads")
PROMPT, CONTINUATION = [2, 17, 300, 5, 99], [7, 8, 500, 3, 3, 42]
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 sums in another order than BLAS's; logits are O(1-10)


def decode_logits(model, prompt, continuation, decoder=None):
    """Logits of prefilling `prompt` through the reference forward, then of feeding
    `continuation` one token at a time through the decode engine (or, without one, through the
    reference forward)."""
    cache = model.new_cache(len(prompt) + len(continuation))
    logits = [model.forward(prompt, cache, last_only=True)[0]]
    step = decoder.step if decoder else lambda token, cache: model.forward([token], cache)[0]
    logits += [step(token, cache) for token in continuation]
    return np.array(logits)


@pytest.mark.parametrize("name", ["mqa", "mha", "gqa"])
def test_decode_engine_matches_the_reference_forward(tiny_checkpoints, name):
    """Every token decoded on the kernels (FAST, EXACT) against model.py's NumPy forward."""
    model = load(tiny_checkpoints[name, "bf16"])
    expected = decode_logits(model, PROMPT, CONTINUATION)
    for reproducible in (False, True):
        decoder = Decoder(model, reproducible)
        assert decoder.on_kernels
        assert decoder.kernels.dense is (kernels.EXACT if reproducible else kernels.FAST)
        np.testing.assert_allclose(decode_logits(model, PROMPT, CONTINUATION, decoder), expected,
                                   **TOL)


@pytest.mark.parametrize("name", ["mqa", "mha", "gqa"])
@pytest.mark.parametrize("length", [1, 7, PREFILL_CHUNK, 2 * PREFILL_CHUNK + 5])
def test_prefill_on_the_kernels_matches_the_reference_forward(tiny_checkpoints, name, length):
    """A prompt prefilled on the kernels (in up to three passes): the last logits and every
    cached key and value."""
    model = load(tiny_checkpoints[name, "f32"])
    ids = prompt(length, seed=length)
    expected_cache = model.new_cache(length + 1)
    expected = model.forward(ids, expected_cache, last_only=True)[0]
    for reproducible in (False, True):
        cache = model.new_cache(length + 1)
        np.testing.assert_allclose(Decoder(model, reproducible).prefill(ids, cache), expected,
                                   **TOL)
        assert cache.length == length
        np.testing.assert_allclose(cache.k, expected_cache.k, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cache.v, expected_cache.v, rtol=1e-5, atol=1e-5)


def test_prefill_continues_a_cache(tiny_checkpoints):
    """A second prompt after a first (a chat turn): causal attention over the cached part too."""
    model = load(tiny_checkpoints["gqa", "bf16"])
    ids = prompt(30, seed=4)
    expected = model.forward(ids, last_only=True)[0]
    decoder = Decoder(model)
    cache = model.new_cache(30)
    decoder.prefill(ids[:12], cache)
    np.testing.assert_allclose(decoder.prefill(ids[12:], cache), expected, **TOL)


@pytest.mark.parametrize("reproducible", [False, True])
def test_step_many_matches_the_reference_forward_of_each_sequence(tiny_checkpoints, reproducible):
    """Three sequences whose caches hold 1, 6 and 20 positions take one step together."""
    model = load(tiny_checkpoints["mha", "bf16"])
    prompts = [prompt(n, seed=n) for n in (1, 6, 20)]
    tokens = [5, 300, 2]
    caches = [model.new_cache(len(p) + 1) for p in prompts]
    for p, cache in zip(prompts, caches):
        model.forward(p, cache, last_only=True)
    logits = Decoder(model, reproducible).step_many(tokens, caches)
    assert logits.shape == (3, model.config.n_real_tokens)
    for p, token, cache, row in zip(prompts, tokens, caches, logits):
        assert cache.length == len(p) + 1
        np.testing.assert_allclose(row, model.forward([*p, token], last_only=True)[0], **TOL)


def test_step_many_needs_one_cache_of_its_own_per_token(tiny_checkpoints):
    model = load(tiny_checkpoints["mqa", "bf16"])
    decoder, cache = Decoder(model), model.new_cache(4)
    with pytest.raises(ValueError, match="one cache per token"):
        decoder.step_many([5, 6], [cache])
    with pytest.raises(ValueError, match="a cache appears twice"):
        decoder.step_many([5, 6], [cache, cache])
    with pytest.raises(ValueError, match="threads must be"):
        Decoder(model, threads=0)


def test_a_one_token_forward_is_the_reference_not_the_kernels(tiny_checkpoints, monkeypatch):
    """Gemma.forward never takes the kernels' path, whatever the number of tokens."""
    model = load(tiny_checkpoints["mqa", "bf16"])
    for name in ("matmul", "qkv", "gate_and_up", "gate_up", "attention", "rms_norm", "rope"):
        monkeypatch.setattr(kernels.FAST, name, None)
        monkeypatch.setattr(kernels.EXACT, name, None)
    cache = model.new_cache(2)
    model.forward([2], cache, last_only=True)
    model.forward([5], cache)


def test_weights_the_kernels_do_not_read_decode_through_the_forward(tiny_checkpoints):
    model = load(tiny_checkpoints["mqa", "bf16"])
    wide = Gemma(model.config, model.weights, np.float64)
    decoder = Decoder(wide)
    assert not decoder.on_kernels
    np.testing.assert_array_equal(decode_logits(wide, PROMPT, CONTINUATION, decoder),
                                  decode_logits(wide, PROMPT, CONTINUATION))
    caches = [wide.new_cache(3), wide.new_cache(3)]
    expected = [wide.new_cache(3), wide.new_cache(3)]  # the same steps through the forward
    np.testing.assert_array_equal(decoder.prefill_many([PROMPT[:2], PROMPT[:1]], caches),
                                  [wide.forward(PROMPT[:2], expected[0], last_only=True)[0],
                                   wide.forward(PROMPT[:1], expected[1], last_only=True)[0]])
    np.testing.assert_array_equal(decoder.step_many([5, 6], caches),
                                  [wide.forward([5], expected[0])[0],
                                   wide.forward([6], expected[1])[0]])


@needs_two_threads
@pytest.mark.parametrize("reproducible", [False, True])
def test_decode_identical_for_one_and_two_threads(tiny_checkpoints, reproducible):
    model = load(tiny_checkpoints["mqa", "bf16"])
    logits = {}
    for threads in (1, 2):
        decoder = Decoder(model, reproducible=reproducible, threads=threads)
        cache = model.new_cache(7)
        first = decoder.prefill([2, 40, 41], cache)
        logits[threads] = [first, *(decoder.step(t, cache) for t in (9, 10, 11, 12))]
    np.testing.assert_array_equal(logits[1], logits[2])


# ----------------------------------------------------------------------------------------------
# The thread count follows the measurements (fake step times: no clock involved)


def steps(policy, seconds_by_count, n, kind=1):
    """Run n layers whose time depends on the thread count; -> the counts used."""
    used = []
    for _ in range(n):
        count = policy.choose(kind)
        policy.record(count, seconds_by_count[count], kind)
        used.append(count)
    return used


def test_thread_count_keeps_all_cores_while_they_are_faster():
    policy = ThreadCount(2)
    used = steps(policy, {1: 0.2, 2: 0.1}, 400)
    assert policy.current == 2 and used[:4] == [2] * 4
    assert used.count(1) <= 6 * ThreadCount.RUNS and used[200:].count(1) <= 2 * ThreadCount.RUNS


def test_thread_count_drops_a_thread_when_a_core_gets_busy_and_comes_back():
    policy = ThreadCount(2)
    steps(policy, {1: 0.2, 2: 0.1}, 20)
    used = steps(policy, {1: 0.2, 2: 0.4}, 8)        # a process takes a core: 2 threads slow
    assert used == [2, 2, 2, 1, 1, 1, 1, 1]          # measured, tried at once, and kept
    used = steps(policy, {1: 0.2, 2: 0.1}, 70)      # the core is free again
    assert policy.current == 2 and used[-1] == 2


def test_thread_count_walks_to_neighbouring_counts():
    policy = ThreadCount(8)
    steps(policy, {n: 1.5 ** abs(n - 3) for n in range(1, 9)}, 400)  # fastest on 3
    assert policy.current == 3


def test_thread_count_compares_runs_of_the_same_kind_only():
    """Prefilling 8 tokens is slower than a one-token step on any count: no reason to switch."""
    policy = ThreadCount(2)
    for _ in range(100):
        steps(policy, {1: 0.4, 2: 0.2}, 1, kind=8)
        steps(policy, {1: 0.2, 2: 0.1}, 1, kind=1)
    assert policy.current == 2


def test_a_trial_cut_short_by_another_kind_of_work_is_tried_again():
    policy = ThreadCount(2)
    steps(policy, {1: 0.4, 2: 0.1}, 4, kind=8)            # prefill layers of 8 tokens
    assert steps(policy, {1: 0.4, 2: 0.1}, 1, kind=8) == [1]  # a trial starts...
    steps(policy, {1: 0.1, 2: 0.3}, 30, kind=1)           # ...and one-token steps follow
    assert policy.current == 1


def test_a_fixed_thread_count_never_changes():
    policy = ThreadCount(1, adapt=False)
    assert set(steps(policy, {1: 0.5}, 10)) == {1}
