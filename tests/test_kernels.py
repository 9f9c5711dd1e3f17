"""Each numba kernel against the plain NumPy expression of model.py that it replaces."""

import numpy as np
import pytest

from minigemma import kernels
from minigemma.model import attention, round_to_bf16, upcast


def bf16_bits(x):
    return (round_to_bf16(x).view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("rows,cols", [(1, 8), (13, 64), (256, 2048), (1000, 37)])
def test_matvec_bf16_equals_numpy(rows, cols):
    rng = np.random.default_rng(rows)
    w = bf16_bits(rng.standard_normal((rows, cols), dtype=np.float32))
    x = rng.standard_normal(cols, dtype=np.float32)
    expected = upcast(w, np.float64) @ x.astype(np.float64)
    np.testing.assert_allclose(kernels.matvec(w, x), expected, rtol=1e-5, atol=1e-5 * np.sqrt(cols))


def test_matvec_f32_equals_numpy():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 129), dtype=np.float32)
    x = rng.standard_normal(129, dtype=np.float32)
    np.testing.assert_allclose(kernels.matvec(w, x), w.astype(np.float64) @ x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n_heads,n_kv,S", [(8, 1, 1), (8, 1, 37), (4, 4, 20), (4, 2, 300)])
def test_decode_attention_equals_numpy_attention(n_heads, n_kv, S):
    rng = np.random.default_rng(S)
    H = 16
    q = rng.standard_normal((n_heads, H), dtype=np.float32)
    k = rng.standard_normal((S, n_kv, H), dtype=np.float32)
    v = rng.standard_normal((S, n_kv, H), dtype=np.float32)
    expected = attention(q[None].astype(np.float64), k.astype(np.float64), v.astype(np.float64), S - 1)
    np.testing.assert_allclose(kernels.decode_attention(q, k, v), expected[0], rtol=1e-5, atol=1e-6)
