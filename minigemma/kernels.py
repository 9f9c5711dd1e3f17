"""numba versions of the hot loops of model.py, for a few tokens at a time.

Decoding one token is a chain of matrix-vector products whose cost is reading every weight from
memory once (5.01 GB of bfloat16 for Gemma 2B). NumPy would first widen a whole bfloat16 matrix
to float32: reading 2 bytes per weight, writing 4 and reading those 4 again, five times the
bytes; these kernels widen each 16-bit weight in a register as they read it (`widen`). Every kernel takes B rows of tokens, x [B, in]: one token
when decoding one sequence, one token of each of B sequences when decoding a batch, or the B
tokens of a short prompt. Each weight is read from memory once for all of them and multiplied
into four tokens while it is in a register, so B tokens cost little more than one until the
multiplications, not the memory, set the pace.

Each kernel is tested against the model.py expression it replaces (tests/test_kernels.py); when
they disagree, model.py is right. Work is split over output rows (or heads), never inside a sum,
so no result depends on the number of threads. A token's result does not depend on the other
tokens beside it either: see "One token, alone or in a batch" below.

Every kernel is compiled twice:
    FAST   fastmath=True: LLVM may split each sum over SIMD lanes, which it needs to keep up with
           memory. The order of the additions then depends on the CPU's vector width.
    EXACT  fastmath=False: every sum runs left to right in float32, one rounding per multiply and
           per add, exactly as written, whatever the CPU; about ten times slower. (exp still
           comes from the platform's math library, and the GELU's tanh from NumPy.)
`minigemma.load(path, reproducible=True)` decodes with EXACT.

Shape legend: B token rows, D d_model, N query heads, K kv heads, H head_dim, F FFN width,
T query tokens, S cached positions.
"""

import types

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import prange
from numba.extending import intrinsic

from .model import gelu_tanh

# ----------------------------------------------------------------------------------------------
# One token, alone or in a batch
#
# A FAST sum is split by LLVM's loop vectorizer into partial sums: 16 SIMD lanes (AVX-512; 8 with
# AVX2) times an "interleave count" of vectors that LLVM picks from the loop's register pressure,
# 4 for a loop over one token's four rows, 1 for a loop over four tokens' sixteen sums. Different
# counts add the same products in a different order: a sequence decoded in a batch would get
# other low bits than decoded alone, and its sampled tokens could differ at near-ties. Fixing the
# count at 1 (llvmlite passes the option to LLVM for every loop compiled in this process from now
# on; numba code elsewhere is only interleaved less) gives every kernel the same partial sums per
# row and token, for any number of tokens beside it (tests/test_batch.py checks the bits).
llvm.set_option("minigemma", "-force-vector-interleave=1")


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
# Row sums. A kernel cuts a matrix's rows into four equal bands and each pass over the columns
# reads one row of every band: four long streams from far-apart addresses keep more memory
# requests in flight than one stream or four adjacent rows (+10-15 % per core, measured on Zen 4),
# and each read of x serves four rows. (Cutting the columns into L1-sized chunks measured slower:
# it breaks the streams.) The small accumulator arrays below live in registers: LLVM promotes them.


@numba.njit(inline="always")  # inlined: compiled with the flags of the kernel that calls it
def dot(w, r, x, t):
    """Row r of the stored weights w [out, in] times token t of x [B, in], summed over columns."""
    acc = np.float32(0.0)
    for c in range(w.shape[1]):
        acc += widen(w[r, c]) * x[t, c]
    return acc


@numba.njit(inline="always")
def band_rows_one_token(w, r, band, x, t, out):
    """Rows r + i band (i < 4) of w times token t of x, into out[t, r + i band]."""
    acc = np.zeros(4, np.float32)
    for c in range(w.shape[1]):
        for i in range(4):
            acc[i] += widen(w[r + i * band, c]) * x[t, c]
    for i in range(4):
        out[t, r + i * band] = acc[i]


@numba.njit(inline="always")
def band_rows_four_tokens(w, r, band, x, t, out):
    """Rows r + i band (i < 4) of w times tokens t..t+3 of x: each weight is widened once and
    multiplied into four tokens while it is in a register."""
    acc = np.zeros((4, 4), np.float32)  # [row, token]
    for c in range(w.shape[1]):
        for i in range(4):
            wide = widen(w[r + i * band, c])
            for j in range(4):
                acc[i, j] += wide * x[t + j, c]
    for i in range(4):
        for j in range(4):
            out[t + j, r + i * band] = acc[i, j]


@numba.njit(inline="always")
def band_rows(w, r, band, x, out):
    """Rows r + i band (i < 4) of w times every token of x [B, in] -> out [B, rows]: four tokens
    at a time, then the last B % 4 one by one (their rows are still in cache)."""
    B = x.shape[0]
    for t in range(0, B - B % 4, 4):
        band_rows_four_tokens(w, r, band, x, t, out)
    for t in range(B - B % 4, B):
        band_rows_one_token(w, r, band, x, t, out)


@numba.njit(inline="always")
def rows_left_over(w, band, x, out):
    """The last rows % 4 rows of w, outside the four bands, times every token of x."""
    for r in range(4 * band, w.shape[0]):
        for t in range(x.shape[0]):
            out[t, r] = dot(w, r, x, t)


# ----------------------------------------------------------------------------------------------
# Kernels, as plain Python functions; `_compile` below turns each into its FAST and EXACT builds.


def matmul(w, x):
    """model.linear for a few tokens: w [out, in] stored weights, x [B, in] float32 -> x W^T."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    band = w.shape[0] // 4
    for r in prange(band):
        band_rows(w, r, band, x, out)
    rows_left_over(w, band, x, out)
    return out


def qkv(w_q, w_k, w_v, x):
    """The q, k and v projections, which share x, in one parallel pass.

    w_q [N*H, D], w_k, w_v [K*H, D] stored weights, x [B, D] float32
    -> (q [B, N*H], k [B, K*H], v [B, K*H]).
    """
    B = x.shape[0]
    q = np.empty((B, w_q.shape[0]), np.float32)
    k = np.empty((B, w_k.shape[0]), np.float32)
    v = np.empty((B, w_v.shape[0]), np.float32)
    bq, bk = w_q.shape[0] // 4, w_k.shape[0] // 4
    for i in prange(bq + 2 * bk):
        if i < bq:
            band_rows(w_q, i, bq, x, q)
        elif i < bq + bk:
            band_rows(w_k, i - bq, bk, x, k)
        else:
            band_rows(w_v, i - bq - bk, bk, x, v)
    rows_left_over(w_q, bq, x, q)
    rows_left_over(w_k, bk, x, k)
    rows_left_over(w_v, bk, x, v)
    return q, k, v


def gate_and_up(w_gate, w_up, y):
    """The two branches of model.geglu, which share y, in one parallel pass: y W_gate^T and
    y W_up^T. w_gate, w_up [F, D] stored weights, y [B, D] float32 -> (gate [B, F], up [B, F])."""
    B, F = y.shape[0], w_gate.shape[0]
    gate = np.empty((B, F), np.float32)
    up = np.empty((B, F), np.float32)
    band = F // 4
    for i in prange(2 * band):
        if i < band:
            band_rows(w_gate, i, band, y, gate)
        else:
            band_rows(w_up, i - band, band, y, up)
    rows_left_over(w_gate, band, y, gate)
    rows_left_over(w_up, band, y, up)
    return gate, up


def rms_norm(x, w, eps):
    """model.rms_norm: x [B, D] float32, w [D] stored weights -> [B, D].

    Not parallel (B x 2048 numbers): one call in place of the ten NumPy operations of
    model.rms_norm, each of which, between weight streams that have flushed every cache, costs
    several us.
    """
    out = np.empty_like(x)
    D = x.shape[1]
    for t in range(x.shape[0]):
        ss = np.float32(0.0)
        for i in range(D):
            ss += x[t, i] * x[t, i]
        inv_rms = np.float32(1) / np.sqrt(ss / np.float32(D) + np.float32(eps))
        for i in range(D):
            out[t, i] = x[t, i] * inv_rms * (np.float32(1) + widen(w[i]))
    return out


def rope(x, positions, inv_freq):
    """model.rope: x [B, heads, H] float32, token t rotated by positions[t] * inv_freq [H/2]."""
    half = inv_freq.shape[0]
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        for i in range(half):
            angle = np.float32(positions[t]) * inv_freq[i]
            cos, sin = np.cos(angle), np.sin(angle)
            for n in range(x.shape[1]):
                x1, x2 = x[t, n, i], x[t, n, half + i]
                out[t, n, i] = x1 * cos - x2 * sin
                out[t, n, half + i] = x2 * cos + x1 * sin
    return out


@numba.njit(inline="always")
def softmax_in_place(x):
    """model.softmax of a vector, as plain loops (NumPy expressions inside a parallel loop are
    compiled by numba into code whose sums, measured, change with the thread count)."""
    top = x[0]
    for s in range(1, x.shape[0]):
        top = max(top, x[s])
    total = np.float32(0.0)
    for s in range(x.shape[0]):
        x[s] = np.exp(x[s] - top)
        total += x[s]
    for s in range(x.shape[0]):
        x[s] /= total


def attention(q, k, v, first_position):
    """model.attention: T new queries over the S = first_position + T cached positions, causal.

    q [T, N, H], k, v [S, K, H] float32 -> [T, N*H]. Query t (at position first_position + t)
    sees positions 0 .. first_position + t; query head n reads kv head n // (N/K).
    """
    T, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    scale = np.float32(head_dim ** -0.5)
    out = np.zeros((T, n_heads, head_dim), np.float32)
    for i in prange(T * n_heads):
        t, n = i // n_heads, i % n_heads
        g = n // group
        seen = first_position + t + 1
        scores = np.empty(seen, np.float32)
        for s in range(seen):
            acc = np.float32(0.0)
            for h in range(head_dim):
                acc += q[t, n, h] * k[s, g, h]
            scores[s] = acc * scale
        softmax_in_place(scores)
        for s in range(seen):
            for h in range(head_dim):
                out[t, n, h] += scores[s] * v[s, g, h]
    return out.reshape(T, n_heads * head_dim)


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
    # fastmath without "nnan" and "ninf": LLVM may still reorder sums, but NaN and infinity keep
    # their IEEE meaning, so a damaged weight gives NaN logits (which the decoder refuses) rather
    # than undefined values; error_model="numpy": x / 0 is inf or NaN, never a ZeroDivisionError.
    flags = {"reassoc", "contract", "arcp", "nsz", "afn"} if fastmath else False
    return numba.njit(parallel=parallel, fastmath=flags, error_model="numpy", cache=True)(kernel)


class Kernels:
    """One build (FAST or EXACT) of every kernel above."""

    def __init__(self, fastmath):
        self.fastmath = fastmath
        self.matmul = _compile(matmul, fastmath)
        self.qkv = _compile(qkv, fastmath)
        self.gate_and_up = _compile(gate_and_up, fastmath)
        self.attention = _compile(attention, fastmath)
        self.rms_norm = _compile(rms_norm, fastmath, parallel=False)
        self.rope = _compile(rope, fastmath, parallel=False)

    def gate_up(self, w_gate, w_up, y):
        """The inner half of model.geglu: gelu_tanh(y W_gate^T) * (y W_up^T). [B, D] -> [B, F]

        The GELU is model.gelu_tanh itself: NumPy's tanh runs in SIMD lanes, ~40x faster than the
        C library's tanhf that a numba loop calls (16 ns per number, measured on Zen 4).
        """
        gate, up = self.gate_and_up(w_gate, w_up, y)
        return gelu_tanh(gate) * up

    def warm_up(self, weight_dtype=np.uint16):
        """Compile (or load from numba's cache) every kernel for the argument types decoding uses
        with weights stored as `weight_dtype` (uint16 bfloat16 bits, or float32)."""
        w = np.zeros((4, 8), weight_dtype)
        w.flags.writeable = False  # memory-mapped weights are read-only arrays to numba
        x = np.zeros((1, 8), np.float32)
        self.matmul(w, x)
        self.qkv(w, w, w, x)
        self.gate_and_up(w, w, x)
        self.attention(np.zeros((1, 2, 8), np.float32), np.zeros((3, 1, 8), np.float32),
                       np.zeros((3, 1, 8), np.float32), 2)
        self.rms_norm(x, w[0], 1e-6)
        self.rope(np.zeros((1, 2, 8), np.float32), np.zeros(1, np.int64), np.zeros(4, np.float32))


FAST = Kernels(fastmath=True)
EXACT = Kernels(fastmath=False)
