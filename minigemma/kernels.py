"""numba versions of the decode-time hot loops of model.py.

Decoding one token is a chain of matrix-vector products whose cost is reading the weights from
memory once. NumPy would first widen a whole bfloat16 matrix to float32 (writing and re-reading
twice the bytes); these kernels widen 16 bits at a time in registers instead.

Each kernel is tested against the model.py expression it replaces (tests/test_kernels.py); when
they disagree, model.py is right. Work is split over output rows, never over a reduction, so the
result does not depend on the number of threads.
"""

import numba
import numpy as np
from numba import prange

ROW_BLOCK = 8  # rows handled per parallel task (one scratch buffer per task)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _matvec_bf16(w, x):
    """w [out, in] bfloat16 bits (uint16), x [in] float32 -> w @ x [out] float32."""
    rows, cols = w.shape
    out = np.empty(rows, np.float32)
    for block in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        bits = np.empty(cols, np.uint32)
        row = bits.view(np.float32)
        for r in range(block * ROW_BLOCK, min(rows, (block + 1) * ROW_BLOCK)):
            for c in range(cols):
                bits[c] = np.uint32(np.uint32(w[r, c]) << np.uint32(16))  # bf16 -> f32, exact
            acc = np.float32(0.0)
            for c in range(cols):
                acc += row[c] * x[c]
            out[r] = acc
    return out


@numba.njit(parallel=True, fastmath=True, cache=True)
def _matvec_f32(w, x):
    """w [out, in] float32, x [in] float32 -> w @ x [out] float32."""
    rows, cols = w.shape
    out = np.empty(rows, np.float32)
    for r in prange(rows):
        acc = np.float32(0.0)
        for c in range(cols):
            acc += w[r, c] * x[c]
        out[r] = acc
    return out


def matvec(w, x):
    """model.linear for one token: w [out, in] (uint16 bf16 bits or float32), x [in] f32 -> [out]."""
    return _matvec_bf16(w, x) if w.dtype == np.uint16 else _matvec_f32(w, x)


@numba.njit(parallel=True, fastmath=True, cache=True)
def decode_attention(q, k, v):
    """model.attention for one new query over S cached positions (all in its past).

    q [N, H], k, v [S, K, H] float32 -> [N*H]. Query head n reads kv head n // (N/K).
    """
    n_heads, head_dim = q.shape
    S, n_kv, _ = k.shape
    group = n_heads // n_kv
    scale = np.float32(head_dim ** -0.5)
    out = np.zeros((n_heads, head_dim), np.float32)
    for n in prange(n_heads):
        g = n // group
        scores = np.empty(S, np.float32)
        for s in range(S):
            acc = np.float32(0.0)
            for h in range(head_dim):
                acc += q[n, h] * k[s, g, h]
            scores[s] = acc * scale
        scores = np.exp(scores - scores.max())
        scores /= scores.sum()
        for s in range(S):
            for h in range(head_dim):
                out[n, h] += scores[s] * v[s, g, h]
    return out.reshape(n_heads * head_dim)
