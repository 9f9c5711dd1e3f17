"""The parity tolerance is tight enough to catch every classic Gemma porting bug.

Each test plants one bug in minigemma (by swapping one function of model.py) and asserts that the
parity check of tests/test_parity.py — max |dlogit| <= 1e-4 against transformers — now fails.
With random weights some of these bugs move the logits by only ~1e-4 relative, so a loose
tolerance (say 1e-2) would let them through.
"""

import math

import numpy as np
import pytest

import minigemma
from minigemma import model as m
from hf_peer import load_peer, peer_logits
from helpers import max_diff, prompt
from test_parity import ATOL


def exact_gelu(x):
    erf = np.vectorize(math.erf, otypes=[x.dtype])
    return 0.5 * x * (1 + erf(x / np.sqrt(2.0)))


def norm_times_w(x, w, eps):
    inv_rms = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + x.dtype.type(eps))
    return x * inv_rms * m.upcast(w, x.dtype)


def interleaved_rope(x, positions, base):
    pairs = x.reshape(*x.shape[:-1], -1, 2)                 # (2i, 2i+1) instead of (i, i + H/2)
    angles = positions[:, None].astype(x.dtype) * m.rope_frequencies(x.shape[-1], base, x.dtype.type)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    a, b = pairs[..., 0], pairs[..., 1]
    return np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape)


def attention_scaled_by_d_over_n(d_model):
    attention = m.attention

    def buggy(q, k, v, first_position):  # scale (D/N)^-0.5 instead of H^-0.5
        H, N = q.shape[-1], q.shape[1]
        return attention(q * q.dtype.type((d_model / N) ** -0.5 / H ** -0.5), k, v, first_position)
    return buggy


BUGS = {
    "exact erf GELU": lambda c: ("gelu_tanh", exact_gelu),
    "RMSNorm times w, not (1 + w)": lambda c: ("rms_norm", norm_times_w),
    "interleaved RoPE": lambda c: ("rope", interleaved_rope),
    "head_dim derived as d_model / heads": lambda c: ("attention", attention_scaled_by_d_over_n(c.d_model)),
    "no sqrt(d_model) embedding scale": lambda c: ("embedding_normalizer", lambda d, mode, dtype: np.dtype(dtype).type(1)),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_parity_check_catches(bug, tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints["mha", "bf16"]  # multi-head with N*H != D, like 7B
    ids = prompt(7)
    ref = peer_logits(load_peer(path), ids)
    assert max_diff(minigemma.load(path).forward(ids), ref) <= ATOL  # the correct model passes
    monkeypatch.setattr(m, *BUGS[bug](minigemma.load(path).config))
    diff = max_diff(minigemma.load(path).forward(ids), ref)
    assert diff > ATOL, f"{bug}: max |dlogit| {diff:.3g} would pass the parity check"
