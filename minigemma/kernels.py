"""numba versions of the decode-time hot loops of model.py.

Decoding one token is a chain of matrix-vector products whose cost is reading every weight from
memory once (5.01 GB of bfloat16 for Gemma 2B). NumPy would first widen a whole bfloat16 matrix
to float32, writing and re-reading three times the bytes; these kernels widen each 16-bit weight
in a register as they read it (`widen`).

Each kernel is tested against the model.py expression it replaces (tests/test_kernels.py); when
they disagree, model.py is right. Work is split over output rows (or heads), never inside a sum,
so no result depends on the number of threads.

Every kernel is compiled twice:
    FAST   fastmath=True: LLVM may split each sum over SIMD lanes, which it needs to keep up with
           memory. The order of the additions then depends on the CPU's vector width.
    EXACT  fastmath=False: every sum runs left to right in float32, one rounding per multiply and
           per add, exactly as written, whatever the CPU; about ten times slower. (exp and tanh
           still come from the platform's math library.)
`minigemma.load(path, reproducible=True)` decodes with EXACT.
"""

import math
import types

import numba
import numpy as np
from llvmlite import ir
from numba import prange
from numba.extending import intrinsic


LONG_ROW = 4096  # columns: beyond this, x (float32) no longer fits in a 32 KB L1 cache with room


@intrinsic
def widen(typingctx, w):
    """One stored weight -> float32, in a register: bfloat16 bits (uint16) or float32.

    bfloat16 is the top half of a float32: shift the 16 bits up and read them as a float. Exact.
    """
    if w not in (numba.types.uint16, numba.types.float32):
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        if w == numba.types.uint16:
            bits = builder.shl(builder.zext(value, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(bits, ir.FloatType())
        return value

    return numba.types.float32(w), codegen


# ----------------------------------------------------------------------------------------------
# Kernels, as plain Python functions; `_compile` below turns each into its FAST and EXACT builds.


@numba.njit(inline="always")  # inlined: compiled with the flags of the kernel that calls it
def dot(w, r, x):
    """Row r of the stored weights w [out, in] times x [in] float32, summed over the columns."""
    acc = np.float32(0.0)
    for c in range(w.shape[1]):
        acc += widen(w[r, c]) * x[c]
    return acc


def matvec(w, x):
    """model.linear for one token: w [out, in] stored weights, x [in] float32 -> w @ x [out]."""
    out = np.empty(w.shape[0], np.float32)
    for r in prange(w.shape[0]):
        out[r] = dot(w, r, x)
    return out


def qkv(w_q, w_k, w_v, x):
    """The q, k and v projections of one token, which share x, in one parallel pass.

    w_q [N*H, D], w_k, w_v [K*H, D] stored weights, x [D] float32 -> (q [N*H], k [K*H], v [K*H]).
    """
    nq, nk = w_q.shape[0], w_k.shape[0]
    out = np.empty(nq + 2 * nk, np.float32)
    for r in prange(nq + 2 * nk):
        if r < nq:
            out[r] = dot(w_q, r, x)
        elif r < nq + nk:
            out[r] = dot(w_k, r - nq, x)
        else:
            out[r] = dot(w_v, r - nq - nk, x)
    return out[:nq], out[nq:nq + nk], out[nq + nk:]


def matvec_by_four(w, x):
    """matvec, four rows per pass over x (rows a multiple of 4).

    For long rows (down_proj: x is 16384 floats, 64 KB, more than the 32-48 KB of L1) reading x
    from L2 once per row costs more than the row itself; sharing each read of x by four rows
    brings the product back to memory speed. Each row still sums its columns in order.
    """
    rows, cols = w.shape
    out = np.empty(rows, np.float32)
    for quad in prange(rows // 4):
        r = 4 * quad
        acc0 = acc1 = acc2 = acc3 = np.float32(0.0)
        for c in range(cols):
            acc0 += widen(w[r, c]) * x[c]
            acc1 += widen(w[r + 1, c]) * x[c]
            acc2 += widen(w[r + 2, c]) * x[c]
            acc3 += widen(w[r + 3, c]) * x[c]
        out[r], out[r + 1], out[r + 2], out[r + 3] = acc0, acc1, acc2, acc3
    return out


def gate_up(w_gate, w_up, y):
    """The inner half of model.geglu for one token: gelu_tanh(w_gate @ y) * (w_up @ y).

    w_gate, w_up [F, D] stored weights, y [D] float32 -> [F]. Row f of both matrices is read in
    the same pass over y.
    """
    rows, cols = w_gate.shape
    out = np.empty(rows, np.float32)
    c, a = np.float32(math.sqrt(2 / math.pi)), np.float32(0.044715)
    for r in prange(rows):
        g = np.float32(0.0)
        u = np.float32(0.0)
        for i in range(cols):
            g += widen(w_gate[r, i]) * y[i]
            u += widen(w_up[r, i]) * y[i]
        gelu = np.float32(0.5) * g * (np.float32(1) + np.tanh(c * (g + a * g * g * g)))  # tanh GELU
        out[r] = gelu * u
    return out


def attention(q, k, v):
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
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        for s in range(S):
            for h in range(head_dim):
                out[n, h] += probs[s] * v[s, g, h]
    return out.reshape(n_heads * head_dim)


# ----------------------------------------------------------------------------------------------


def _compile(kernel, fastmath):
    """The numba build of `kernel`, cached on disk.

    numba's cache tells builds apart by function name and argument types, not by compiler flags,
    so the EXACT build compiles a copy of the function renamed with an "_exact" suffix.
    """
    if not fastmath:
        name = kernel.__name__ + "_exact"
        kernel = types.FunctionType(kernel.__code__, kernel.__globals__, name)
        kernel.__qualname__ = name
    return numba.njit(parallel=True, fastmath=fastmath, cache=True)(kernel)


class Kernels:
    """One build (FAST or EXACT) of every kernel above."""

    def __init__(self, fastmath):
        self.fastmath = fastmath
        self.matvec_by_row = _compile(matvec, fastmath)
        self.matvec_by_four = _compile(matvec_by_four, fastmath)
        self.qkv = _compile(qkv, fastmath)
        self.gate_up = _compile(gate_up, fastmath)
        self.attention = _compile(attention, fastmath)

    def matvec(self, w, x):
        """w [out, in] stored weights, x [in] float32 -> w @ x [out]; long rows four at a time."""
        if w.shape[1] > LONG_ROW and w.shape[0] % 4 == 0:
            return self.matvec_by_four(w, x)
        return self.matvec_by_row(w, x)


FAST = Kernels(fastmath=True)
EXACT = Kernels(fastmath=False)
