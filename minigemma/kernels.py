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


@numba.njit(inline="always")
def dot_bands(w, r, band, x, out):
    """Rows r, r + band, r + 2 band and r + 3 band of w times x, in one pass over x, into out."""
    acc0 = acc1 = acc2 = acc3 = np.float32(0.0)
    for c in range(w.shape[1]):
        acc0 += widen(w[r, c]) * x[c]
        acc1 += widen(w[r + band, c]) * x[c]
        acc2 += widen(w[r + 2 * band, c]) * x[c]
        acc3 += widen(w[r + 3 * band, c]) * x[c]
    out[r], out[r + band], out[r + 2 * band], out[r + 3 * band] = acc0, acc1, acc2, acc3


def matvec(w, x):
    """model.linear for one token: w [out, in] stored weights, x [in] float32 -> w @ x [out].

    The rows are cut into four equal bands and each pass over x reads one row of every band: four
    long streams from far-apart addresses keep more memory requests in flight than one stream or
    four adjacent rows (+10-15 % per core, measured on Zen 4), and each read of x serves four
    rows, which matters when x does not fit in L1 (down_proj: 16384 floats, 64 KB). Each row still
    sums its columns in order. (Cutting the columns into L1-sized chunks measured slower: it breaks
    the streams.)
    """
    rows = w.shape[0]
    band = rows // 4
    out = np.empty(rows, np.float32)
    for r in prange(band):
        dot_bands(w, r, band, x, out)
    for r in range(4 * band, rows):  # the last rows % 4 rows
        out[r] = dot(w, r, x)
    return out


def qkv(w_q, w_k, w_v, x):
    """The q, k and v projections of one token, which share x, in one parallel pass.

    w_q [N*H, D], w_k, w_v [K*H, D] stored weights, x [D] float32 -> (q [N*H], k [K*H], v [K*H]).
    Each matrix is read in four bands, as in matvec.
    """
    q = np.empty(w_q.shape[0], np.float32)
    k = np.empty(w_k.shape[0], np.float32)
    v = np.empty(w_v.shape[0], np.float32)
    bq, bk = w_q.shape[0] // 4, w_k.shape[0] // 4
    for i in prange(bq + 2 * bk):
        if i < bq:
            dot_bands(w_q, i, bq, x, q)
        elif i < bq + bk:
            dot_bands(w_k, i - bq, bk, x, k)
        else:
            dot_bands(w_v, i - bq - bk, bk, x, v)
    for r in range(4 * bq, len(q)):  # the last rows % 4 rows
        q[r] = dot(w_q, r, x)
    for r in range(4 * bk, len(k)):
        k[r] = dot(w_k, r, x)
        v[r] = dot(w_v, r, x)
    return q, k, v


def gate_up(w_gate, w_up, y):
    """The inner half of model.geglu for one token: gelu_tanh(w_gate @ y) * (w_up @ y).

    w_gate, w_up [F, D] stored weights, y [D] float32 -> [F]. Row f of both matrices is read in
    the same pass over y: two streams already (reading four, in bands as matvec does, measured
    slower here).
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


def rms_norm(x, w, eps):
    """model.rms_norm for one token: x [D] float32, w [D] stored weights -> [D].

    Not parallel (2048 numbers): one call in place of the ten NumPy operations of model.rms_norm,
    each of which, between weight streams that have flushed every cache, costs several us.
    """
    ss = np.float32(0.0)
    for i in range(x.shape[0]):
        ss += x[i] * x[i]
    inv_rms = np.float32(1) / np.sqrt(ss / np.float32(x.shape[0]) + np.float32(eps))
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = x[i] * inv_rms * (np.float32(1) + widen(w[i]))
    return out


def rope(x, position, inv_freq):
    """model.rope for one token: x [heads, H] float32 rotated by position * inv_freq [H/2]."""
    half = inv_freq.shape[0]
    out = np.empty_like(x)
    for i in range(half):
        angle = np.float32(position) * inv_freq[i]
        cos, sin = np.cos(angle), np.sin(angle)
        for n in range(x.shape[0]):
            x1, x2 = x[n, i], x[n, half + i]
            out[n, i] = x1 * cos - x2 * sin
            out[n, half + i] = x2 * cos + x1 * sin
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


def _compile(kernel, fastmath, parallel=True):
    """The numba build of `kernel`, cached on disk (parallel: its prange loops run on all threads).

    numba's cache tells builds apart by function name and argument types, not by compiler flags,
    so the EXACT build compiles a copy of the function renamed with an "_exact" suffix.
    """
    if not fastmath:
        name = kernel.__name__ + "_exact"
        kernel = types.FunctionType(kernel.__code__, kernel.__globals__, name)
        kernel.__qualname__ = name
    return numba.njit(parallel=parallel, fastmath=fastmath, cache=True)(kernel)


class Kernels:
    """One build (FAST or EXACT) of every kernel above."""

    def __init__(self, fastmath):
        self.fastmath = fastmath
        self.matvec = _compile(matvec, fastmath)
        self.qkv = _compile(qkv, fastmath)
        self.gate_up = _compile(gate_up, fastmath)
        self.attention = _compile(attention, fastmath)
        self.rms_norm = _compile(rms_norm, fastmath, parallel=False)
        self.rope = _compile(rope, fastmath, parallel=False)

    def warm_up(self, weight_dtype=np.uint16):
        """Compile (or load from numba's cache) every kernel for the argument types decoding uses
        with weights stored as `weight_dtype` (uint16 bfloat16 bits, or float32)."""
        w = np.zeros((4, 8), weight_dtype)
        w.flags.writeable = False  # memory-mapped weights are read-only arrays to numba
        x = np.zeros(8, np.float32)
        self.matvec(w, x)
        self.qkv(w, w, w, x)
        self.gate_up(w, w, x)
        self.attention(np.zeros((2, 8), np.float32), np.zeros((3, 1, 8), np.float32),
                       np.zeros((3, 1, 8), np.float32))
        self.rms_norm(x, w[0], 1e-6)
        self.rope(np.zeros((2, 8), np.float32), np.int64(3), np.zeros(4, np.float32))


FAST = Kernels(fastmath=True)
EXACT = Kernels(fastmath=False)
