"""The decode engine (decode.py) against the reference forward (model.py), token by token."""

import numba
import numpy as np
import pytest

from minigemma import kernels, load
from minigemma.decode import Decoder
from minigemma.model import Gemma

needs_two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                                       reason="needs 2 numba threads")
PROMPT, CONTINUATION = [2, 17, 300, 5, 99], [7, 8, 500, 3, 3, 42]


def decode_logits(model, prompt, continuation, decoder=None):
    """Logits of prefilling `prompt`, then of feeding `continuation` one token at a time, through
    the decode engine (or, without one, through the reference forward)."""
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
        assert decoder.on_kernels and decoder.kernels is (kernels.EXACT if reproducible
                                                          else kernels.FAST)
        np.testing.assert_allclose(decode_logits(model, PROMPT, CONTINUATION, decoder), expected,
                                   rtol=1e-4, atol=1e-4)


def test_a_one_token_forward_is_the_reference_not_the_kernels(tiny_checkpoints, monkeypatch):
    """Gemma.forward never takes the kernels' path, whatever the number of tokens."""
    model = load(tiny_checkpoints["mqa", "bf16"])
    for name in ("matvec", "qkv", "gate_up", "attention", "rms_norm", "rope"):
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


@needs_two_threads
def test_reproducible_decode_identical_for_one_and_two_threads(tiny_checkpoints):
    model = load(tiny_checkpoints["mqa", "bf16"])
    decoder = Decoder(model, reproducible=True)
    try:
        numba.set_num_threads(1)
        one = decode_logits(model, [2, 40, 41], [9, 10, 11, 12], decoder)
        numba.set_num_threads(2)
        two = decode_logits(model, [2, 40, 41], [9, 10, 11, 12], decoder)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    np.testing.assert_array_equal(one, two)
