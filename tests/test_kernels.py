"""Each numba kernel against the plain NumPy expression of model.py that it replaces.

References are computed in float64 from the same (exactly widened) weights. Tolerances: a float32
sum of n products differs from the exact value by at most ~n * 2^-24 * sum|w x|; the tests allow
1e-6 * sqrt(n)-scaled relative errors, far below what a wrong widening, a missing row or a wrong
kv head (errors of order 1) would give. Every kernel takes B rows of tokens; B = 1 (one decode
step), 4 (one tile of four tokens) and 5 or 9 (tiles and tokens left over) are all checked.
"""

import numba
import numpy as np
import pytest

from minigemma import kernels
from minigemma.model import (attention, gelu_tanh, linear, rms_norm, rope,
                             rope_frequencies, round_to_bf16, upcast)

BUILDS = {"fast": kernels.FAST, "exact": kernels.EXACT}
needs_two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                                       reason="numba has a single thread on this machine")


def bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), as a checkpoint stores them."""
    return (round_to_bf16(x).view(np.uint32) >> 16).astype(np.uint16)


def random_weight(rng, rows, cols, stored):
    w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(cols ** -0.5)
    return bf16_bits(w) if stored == "bf16" else w


def assert_close_sum(actual, expected, magnitude, n):
    """|actual - expected| <= 1e-6 sqrt(n) * sum|terms| (+ float32 resolution of the result)."""
    bound = 1e-6 * np.sqrt(n) * magnitude + 1e-7 * np.abs(expected)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    assert np.all(np.abs(actual - expected) <= bound), np.max(np.abs(actual - expected) / bound)


def expected_linear(x, w):
    """model.linear in float64, and sum |w x| of every output (the scale of its rounding)."""
    x64 = x.astype(np.float64)
    return linear(x64, w, np.float64), np.abs(x64) @ np.abs(upcast(w, np.float64)).T


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("stored", ["bf16", "f32"])
# (8, 5000) and (12, 20000): long rows, x past L1; 13, 1000 and 3 rows leave rows % 4 over
@pytest.mark.parametrize("rows,cols", [(1, 8), (13, 64), (256, 2048), (1000, 37), (3, 16384),
                                       (8, 5000), (12, 20000)])
@pytest.mark.parametrize("B", [1, 5])
def test_matmul_equals_linear(build, stored, rows, cols, B):
    rng = np.random.default_rng(rows * cols + B)
    w = random_weight(rng, rows, cols, stored)
    x = rng.standard_normal((B, cols), dtype=np.float32)
    expected, magnitude = expected_linear(x, w)
    assert_close_sum(BUILDS[build].matmul(w, x), expected, magnitude, cols)


@pytest.mark.parametrize("cols", [3000, 5000])
@pytest.mark.parametrize("B", [1, 4, 9])
def test_exact_matmul_sums_left_to_right_in_float32(cols, B):
    """EXACT is the textbook loop: acc = fl(acc + fl(w*x)) in column order, bit for bit, for
    tokens in a tile of four and tokens alone, rows in the four bands and rows left over."""
    rng = np.random.default_rng(1)
    w = random_weight(rng, 55, cols, "bf16")
    x = rng.standard_normal((B, cols), dtype=np.float32)
    products = upcast(w)[None] * x[:, None, :]                                # [B, rows, cols]
    sequential = np.cumsum(products, axis=2, dtype=np.float32)[:, :, -1]     # cumsum adds in order
    np.testing.assert_array_equal(kernels.EXACT.matmul(w, x), sequential)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("nq,nk", [(2048, 256), (26, 7), (3, 1)])  # 26, 7, 3, 1: tail rows
@pytest.mark.parametrize("B", [1, 6])
def test_qkv_equals_three_linears(build, nq, nk, B):
    rng = np.random.default_rng(nq + nk)
    D = 512
    w_q, w_k, w_v = (random_weight(rng, n, D, "bf16") for n in (nq, nk, nk))
    x = rng.standard_normal((B, D), dtype=np.float32)
    for w, actual in zip((w_q, w_k, w_v), BUILDS[build].qkv(w_q, w_k, w_v, x)):
        expected, magnitude = expected_linear(x, w)
        assert_close_sum(actual, expected, magnitude, D)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("stored", ["bf16", "f32"])
def test_rms_norm_equals_numpy_rms_norm(build, stored):
    rng = np.random.default_rng(6)
    D = 2048
    x = rng.standard_normal((3, D), dtype=np.float32) * np.float32(20)
    w = random_weight(rng, 1, D, stored)[0]
    expected = rms_norm(x.astype(np.float64), w, 1e-6)
    np.testing.assert_allclose(BUILDS[build].rms_norm(x, w, 1e-6), expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("heads,positions", [(8, [0]), (8, [37, 38, 39]), (1, [5000]),
                                             (4, [8191, 3, 100])])
def test_rope_equals_numpy_rope(build, heads, positions):
    """The kernel rotates token t by positions[t] * inv_freq in float32 as model.rope does; large
    positions make angles of thousands of radians, where any difference in forming the angle
    would show."""
    rng = np.random.default_rng(positions[0])
    H = 256
    x = rng.standard_normal((len(positions), heads, H), dtype=np.float32)
    positions = np.array(positions)
    inv_freq = rope_frequencies(H, 10000.0, np.float32)
    expected = rope(x, positions, 10000.0)  # float32, as model.py computes it
    np.testing.assert_allclose(BUILDS[build].rope(x, positions, inv_freq), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("F,B", [(200, 1), (200, 6), (203, 5)])  # 203: F % 4 rows left over
def test_gate_up_equals_geglu_inner(build, F, B):
    rng = np.random.default_rng(2)
    D = 96
    w_gate, w_up = random_weight(rng, F, D, "bf16"), random_weight(rng, F, D, "bf16")
    y = rng.standard_normal((B, D), dtype=np.float32) * np.float32(3)  # gate values up to ~+-10
    for w, actual in zip((w_gate, w_up), BUILDS[build].gate_and_up(w_gate, w_up, y)):
        expected, magnitude = expected_linear(y, w)
        assert_close_sum(actual, expected, magnitude, D)
    y64 = y.astype(np.float64)
    expected = gelu_tanh(linear(y64, w_gate, np.float64)) * linear(y64, w_up, np.float64)
    np.testing.assert_allclose(BUILDS[build].gate_up(w_gate, w_up, y), expected,
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("n_heads,n_kv,S,T", [(8, 1, 1, 1), (8, 1, 37, 1), (4, 4, 20, 1),
                                              (4, 2, 300, 1), (8, 1, 9, 9), (4, 2, 40, 7)])
def test_attention_equals_numpy_attention(build, n_heads, n_kv, S, T):
    """T new queries after S - T cached positions: one decode step (T = 1), a prompt (T = S) and
    a prompt continuing a cache, causal."""
    rng = np.random.default_rng(S + T)
    H = 16
    q = rng.standard_normal((T, n_heads, H), dtype=np.float32)
    k = rng.standard_normal((S, n_kv, H), dtype=np.float32)
    v = rng.standard_normal((S, n_kv, H), dtype=np.float32)
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    expected = attention(q64, k64, v64, S - T)
    np.testing.assert_allclose(BUILDS[build].attention(q, k, v, S - T), expected,
                               rtol=1e-5, atol=1e-6)


def test_prefill_linear_widens_in_blocks_exactly():
    """linear() widens 16 MB row blocks into a reused buffer: 1300 rows x 8192 = 3 blocks."""
    rng = np.random.default_rng(3)
    w = random_weight(rng, 1300, 8192, "bf16")
    x = rng.standard_normal((3, 8192), dtype=np.float32)
    expected = x.astype(np.float64) @ upcast(w, np.float64).T
    np.testing.assert_allclose(linear(x, w, np.float32), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(linear(x.astype(np.float64), w, np.float64), expected, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# Results do not depend on the number of threads; EXACT is also independent of fastmath.


def run_kernels(build):
    rng = np.random.default_rng(4)
    w = random_weight(rng, 517, 300, "bf16")
    x = rng.standard_normal((6, 300), dtype=np.float32)
    q = rng.standard_normal((3, 8, 32), dtype=np.float32)
    k, v = rng.standard_normal((2, 77, 1, 32), dtype=np.float32)
    long = random_weight(rng, 36, 5000, "bf16")
    x_long = rng.standard_normal((5, 5000), dtype=np.float32)
    return [build.matmul(w, x), build.matmul(long, x_long), build.attention(q, k, v, 74),
            *build.gate_and_up(w, w[::-1].copy(), x),
            *build.qkv(w, w[:33].copy(), w[40:73].copy(), x)]


@needs_two_threads
@pytest.mark.parametrize("build", BUILDS)
def test_kernels_identical_for_one_and_two_threads(build):
    try:
        numba.set_num_threads(1)
        one = run_kernels(BUILDS[build])
        numba.set_num_threads(2)
        two = run_kernels(BUILDS[build])
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
