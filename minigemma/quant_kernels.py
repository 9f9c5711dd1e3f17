"""numba matrix-vector kernels that read quantized weights as stored (quant.py), for decoding.

Decoding one token reads every weight once. NumPy would first dequantize a whole matrix to
float32, writing and re-reading 4 to 7 times the stored bytes; these kernels read the stored
blocks and turn each small integer into float32 in a register, with its block's scales:

    Int8Rows    gemma_pytorch's int8           w = q * scaler[row]               q int8
    GGUF Q8_0   34 bytes for 32 weights        w = q * d                         q int8
    GGUF Q4_0   18 bytes for 32 weights        w = d * (q - 8)                   q 4 bits
    GGUF Q5_0   22 bytes for 32 weights        w = d * (q - 16)                  q 5 bits
    GGUF Q4_K   144 bytes for 256 weights      w = (d * sc) * q - (dmin * m)     q 4 bits
    GGUF Q5_K   176 bytes for 256 weights      w = (d * sc) * q - (dmin * m)     q 5 bits
    GGUF Q6_K   210 bytes for 256 weights      w = (d * sc) * (q - 32)           q 6 bits

(d, dmin float16 per block; sc, m 6-bit per 32 weights, or sc int8 per 16 for Q6_K.) Each
weight is the float32 that the `gguf` package's dequantizer (gguf.quants: llama.cpp's own Python
package) gives, formed by the same float32 operations in the same order; tests/
test_quant_kernels.py checks it bit for bit. Work is split over output rows, never inside a sum,
so no result depends on the number of threads.

Two builds, as in kernels.py (compiled by its `_compile`):
    EXACT  fastmath=False: each row's products w * x are added left to right in float32, one
           rounding per multiply and per add: the bits of summing the gguf-dequantized row times
           x in order, whatever the CPU. About ten times slower.
    FAST   fastmath=True: the same weights, but each run of 256 of them (a K-quant super-block,
           or 8 blocks of 32) is summed on its own in SIMD lanes, and the runs' sums are added in
           order. The kernels are written so, not left to LLVM: summed left to right, each block
           would wait for the previous block's sum.

Shape legend: rows and cols of the [out, in] weight; B token rows.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import prange
from numba.extending import intrinsic

from .kernels import _compile
from .quant import GGMLBlocks, Int8Rows

# The ggml block formats read here, by their number in GGUF files (ggml's enum ggml_type; the
# gguf package, an optional dependency, calls them GGMLQuantizationType.Q4_0 ...).
Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K = 2, 6, 8, 12, 13, 14
NAMES = {Q8_0: "Q8_0", Q4_0: "Q4_0", Q5_0: "Q5_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}


# ----------------------------------------------------------------------------------------------
# Reading stored bytes as numbers


@intrinsic
def half(typingctx, lo, hi):
    """A float16 stored as two bytes, little-endian -> float32, in a register. Exact."""
    if lo != numba.types.uint8 or hi != numba.types.uint8:
        return None

    def codegen(context, builder, signature, args):
        i16 = ir.IntType(16)
        lo, hi = (builder.zext(a, i16) for a in args)
        bits = builder.or_(lo, builder.shl(hi, ir.Constant(i16, 8)))
        return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())

    return numba.types.float32(lo, hi), codegen


@numba.njit(inline="always")
def as_float(q):
    """A small integer (a quant, a scale) -> float32, exactly."""
    return np.float32(np.int32(q))


# The bit fields of a byte, computed in 8 bits. (`byte >> 4` would be computed in 64 bits: numba
# widens integer expressions, and LLVM then converts 8 quants per SIMD register instead of 16.)

@numba.njit(inline="always")
def bits(byte, shift, width):
    """(byte >> shift) & (2**width - 1), a uint8."""
    return np.bitwise_and(np.right_shift(byte, np.uint8(shift)), np.uint8((1 << width) - 1))


@numba.njit(inline="always")
def join(low, high):
    """A 5- or 6-bit quant from its low nibble and its high bits: low | high << 4."""
    return np.bitwise_or(low, np.left_shift(high, np.uint8(4)))


# ----------------------------------------------------------------------------------------------
# The formats. `<format>_weight` (or `_quant` with `k_scale_min`) is one weight of a stored block
# blk (a uint8 array), the float32 that gguf's dequantizer gives, formed by the same float32
# operations in the same order.


# Q8_0: d (float16), then 32 int8 quants. gguf: w = q * d.

@numba.njit(inline="always")
def q8_0_weight(blk, j):
    return as_float(np.int8(blk[2 + j])) * half(blk[0], blk[1])


# Q4_0: d (float16), then 16 bytes: weight j < 16 is the low nibble of byte j, weight 16 + j its
# high nibble. gguf: w = d * (q - 8).

@numba.njit(inline="always")
def q4_0_weight(blk, j):
    q = bits(blk[2 + j % 16], 4 * (j // 16), 4)
    return half(blk[0], blk[1]) * (as_float(q) - np.float32(8))


# Q5_0: d (float16), 4 bytes of high bits (bit j of this little-endian uint32 is bit 4 of weight
# j), then 16 bytes of low nibbles as in Q4_0. gguf: w = d * (q - 16).

@numba.njit(inline="always")
def q5_0_weight(blk, j):
    qh = np.uint32(blk[2] | blk[3] << 8 | blk[4] << 16 | blk[5] << 24)
    high = np.uint8(np.bitwise_and(np.right_shift(qh, np.uint32(j)), np.uint32(1)))  # see bits
    q = join(bits(blk[6 + j % 16], 4 * (j // 16), 4), high)
    return half(blk[0], blk[1]) * (as_float(q) - np.float32(16))


# Q4_K: a super-block of 256 weights in 8 sub-blocks s of 32: d, dmin (float16), 12 bytes packing
# 8 six-bit scales sc and 8 six-bit mins m, then 128 bytes of nibbles: bytes 32i..32i+31 hold
# sub-block 2i in their low nibbles and sub-block 2i + 1 in their high nibbles.
# gguf: w = (d * sc) * q - (dmin * m).

@numba.njit(inline="always")
def k_scale_min(blk, s):
    """(d * sc, dmin * m) of sub-block s of a Q4_K or Q5_K super-block, as gguf forms them.

    The 12 bytes at 4: bytes 0-3 hold sc 0-3 (6 low bits), bytes 4-7 m 0-3, bytes 8-11 the low
    4 bits of sc 4-7 and (high nibble) m 4-7, whose top 2 bits are the top bits of bytes 0-7.
    """
    k = blk[4:16]
    if s < 4:
        sc, m = k[s] & 63, k[s + 4] & 63
    else:
        sc, m = (k[s + 4] & 15) | ((k[s - 4] >> 2) & 48), (k[s + 4] >> 4) | ((k[s] >> 2) & 48)
    return half(blk[0], blk[1]) * as_float(sc), half(blk[2], blk[3]) * as_float(m)


@numba.njit(inline="always")
def q4_k_quant(blk, s, j):
    """q of weight j of sub-block s, as a float."""
    return as_float(bits(blk[16 + 32 * (s // 2) + j], 4 * (s % 2), 4))


# Q5_K: as Q4_K, with 32 bytes of high bits after the scales (bit s of byte j is bit 4 of weight
# j of sub-block s); the nibbles follow, at 48.

@numba.njit(inline="always")
def q5_k_quant(blk, s, j):
    low = bits(blk[48 + 32 * (s // 2) + j], 4 * (s % 2), 4)
    return as_float(join(low, bits(blk[16 + j], s, 1)))


# Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales (one per 16
# weights), d (float16) at 208. In half h = s // 4 of the super-block, sub-block k = s % 4 takes
# the low (k = 0, 1) or high (k = 2, 3) nibbles of bytes 64h + 32(k % 2) + j and bits 2k, 2k + 1
# of bytes 128 + 32h + j. gguf: w = (d * sc) * (q - 32).

@numba.njit(inline="always")
def q6_k_weight(blk, s, j):
    h, k = s // 4, s % 4
    scale = half(blk[208], blk[209]) * as_float(np.int8(blk[192 + 2 * s + j // 16]))
    q = join(bits(blk[64 * h + 32 * (k % 2) + j], 4 * (k // 2), 4),
             bits(blk[128 + 32 * h + j], 2 * k, 2))
    return scale * (as_float(q) - np.float32(32))


# ----------------------------------------------------------------------------------------------
# Kernels: `<format>_exact(raw, x)` and `<format>_fast(raw, x)` compute w @ x for the stored
# weights raw [rows, bytes] uint8 and x [cols] float32 -> [rows] float32, rows in parallel.
#
# FAST sums each run of 256 weights on its own, in SIMD lanes, and adds these sums in order. Its
# loop runs over the position j in a block (or sub-block) of 32 and reads position j of 8 of them
# at once: LLVM would unroll a loop over the 32 weights of one block and then vectorize across
# blocks, 34 bytes apart, with gathers. Rows of blocks of 32 that are not a multiple of 256
# weights end with single blocks, in order.


@numba.njit(inline="always")
def q8_0_block(blk, xb, acc):
    """acc + the 32 products of one block, left to right."""
    for j in range(32):
        acc += q8_0_weight(blk, j) * xb[j]
    return acc


def q8_0_exact(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for r in prange(raw.shape[0]):
        acc = np.float32(0.0)
        for b in range(len(x) // 32):
            acc = q8_0_block(raw[r, 34 * b:34 * b + 34], x[32 * b:32 * b + 32], acc)
        out[r] = acc
    return out


def q8_0_fast(raw, x):
    groups = len(x) // 256
    out = np.empty(raw.shape[0], np.float32)
    for r in prange(raw.shape[0]):
        acc = np.float32(0.0)
        for g in range(groups):
            grp, xg = raw[r, 272 * g:272 * g + 272], x[256 * g:256 * g + 256]
            part = np.float32(0.0)
            for j in range(32):
                for k in range(8):
                    part += q8_0_weight(grp[34 * k:34 * k + 34], j) * xg[32 * k + j]
            acc += part
        for b in range(8 * groups, len(x) // 32):
            acc = q8_0_block(raw[r, 34 * b:34 * b + 34], x[32 * b:32 * b + 32], acc)
        out[r] = acc
    return out


@numba.njit(inline="always")
def q4_0_block(blk, xb, acc):
    for j in range(32):
        acc += q4_0_weight(blk, j) * xb[j]
    return acc


def q4_0_exact(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for r in prange(raw.shape[0]):
        acc = np.float32(0.0)
        for b in range(len(x) // 32):
            acc = q4_0_block(raw[r, 18 * b:18 * b + 18], x[32 * b:32 * b + 32], acc)
        out[r] = acc
    return out


def q4_0_fast(raw, x):
    groups = len(x) // 256
    out = np.empty(raw.shape[0], np.float32)
    for r in prange(raw.shape[0]):
        acc = np.float32(0.0)
        for g in range(groups):
            grp, xg = raw[r, 144 * g:144 * g + 144], x[256 * g:256 * g + 256]
            part = np.float32(0.0)
            for j in range(16):  # the low and the high nibble of byte j of each block
                for k in range(8):
                    blk = grp[18 * k:18 * k + 18]
                    part += (q4_0_weight(blk, j) * xg[32 * k + j]
                             + q4_0_weight(blk, 16 + j) * xg[32 * k + 16 + j])
            acc += part
        for b in range(8 * groups, len(x) // 32):
            acc = q4_0_block(raw[r, 18 * b:18 * b + 18], x[32 * b:32 * b + 32], acc)
        out[r] = acc
    return out


@numba.njit(inline="always")
def q5_0_block(blk, xb, acc):
    for j in range(32):
        acc += q5_0_weight(blk, j) * xb[j]
    return acc


def q5_0_exact(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for r in prange(raw.shape[0]):
        acc = np.float32(0.0)
        for b in range(len(x) // 32):
            acc = q5_0_block(raw[r, 22 * b:22 * b + 22], x[32 * b:32 * b + 32], acc)
        out[r] = acc
    return out


def q5_0_fast(raw, x):
    groups = len(x) // 256
    out = np.empty(raw.shape[0], np.float32)
    for r in prange(raw.shape[0]):
        acc = np.float32(0.0)
        for g in range(groups):
            grp, xg = raw[r, 176 * g:176 * g + 176], x[256 * g:256 * g + 256]
            part = np.float32(0.0)
            for j in range(16):
                for k in range(8):
                    blk = grp[22 * k:22 * k + 22]
                    part += (q5_0_weight(blk, j) * xg[32 * k + j]
                             + q5_0_weight(blk, 16 + j) * xg[32 * k + 16 + j])
            acc += part
        for b in range(8 * groups, len(x) // 32):
            acc = q5_0_block(raw[r, 22 * b:22 * b + 22], x[32 * b:32 * b + 32], acc)
        out[r] = acc
    return out


def q4_k_exact(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for r in prange(raw.shape[0]):
        acc = np.float32(0.0)
        for b in range(len(x) // 256):
            blk, xb = raw[r, 144 * b:144 * b + 144], x[256 * b:256 * b + 256]
            for s in range(8):
                scale, min_ = k_scale_min(blk, s)
                for j in range(32):
                    acc += (scale * q4_k_quant(blk, s, j) - min_) * xb[32 * s + j]
        out[r] = acc
    return out


def q4_k_fast(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for r in prange(raw.shape[0]):
        acc = np.float32(0.0)
        for b in range(len(x) // 256):
            blk, xb = raw[r, 144 * b:144 * b + 144], x[256 * b:256 * b + 256]
            d0, m0 = k_scale_min(blk, 0)
            d1, m1 = k_scale_min(blk, 1)
            d2, m2 = k_scale_min(blk, 2)
            d3, m3 = k_scale_min(blk, 3)
            d4, m4 = k_scale_min(blk, 4)
            d5, m5 = k_scale_min(blk, 5)
            d6, m6 = k_scale_min(blk, 6)
            d7, m7 = k_scale_min(blk, 7)
            p0 = p1 = p2 = p3 = np.float32(0.0)  # one sum per pair of sub-blocks
            for j in range(32):
                p0 += ((d0 * q4_k_quant(blk, 0, j) - m0) * xb[j]
                       + (d1 * q4_k_quant(blk, 1, j) - m1) * xb[32 + j])
                p1 += ((d2 * q4_k_quant(blk, 2, j) - m2) * xb[64 + j]
                       + (d3 * q4_k_quant(blk, 3, j) - m3) * xb[96 + j])
                p2 += ((d4 * q4_k_quant(blk, 4, j) - m4) * xb[128 + j]
                       + (d5 * q4_k_quant(blk, 5, j) - m5) * xb[160 + j])
                p3 += ((d6 * q4_k_quant(blk, 6, j) - m6) * xb[192 + j]
                       + (d7 * q4_k_quant(blk, 7, j) - m7) * xb[224 + j])
            acc += (p0 + p1) + (p2 + p3)
        out[r] = acc
    return out


def q5_k_exact(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for r in prange(raw.shape[0]):
        acc = np.float32(0.0)
        for b in range(len(x) // 256):
            blk, xb = raw[r, 176 * b:176 * b + 176], x[256 * b:256 * b + 256]
            for s in range(8):
                scale, min_ = k_scale_min(blk, s)
                for j in range(32):
                    acc += (scale * q5_k_quant(blk, s, j) - min_) * xb[32 * s + j]
        out[r] = acc
    return out


def q5_k_fast(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for r in prange(raw.shape[0]):
        acc = np.float32(0.0)
        for b in range(len(x) // 256):
            blk, xb = raw[r, 176 * b:176 * b + 176], x[256 * b:256 * b + 256]
            d0, m0 = k_scale_min(blk, 0)
            d1, m1 = k_scale_min(blk, 1)
            d2, m2 = k_scale_min(blk, 2)
            d3, m3 = k_scale_min(blk, 3)
            d4, m4 = k_scale_min(blk, 4)
            d5, m5 = k_scale_min(blk, 5)
            d6, m6 = k_scale_min(blk, 6)
            d7, m7 = k_scale_min(blk, 7)
            p0 = p1 = p2 = p3 = np.float32(0.0)
            for j in range(32):
                p0 += ((d0 * q5_k_quant(blk, 0, j) - m0) * xb[j]
                       + (d1 * q5_k_quant(blk, 1, j) - m1) * xb[32 + j])
                p1 += ((d2 * q5_k_quant(blk, 2, j) - m2) * xb[64 + j]
                       + (d3 * q5_k_quant(blk, 3, j) - m3) * xb[96 + j])
                p2 += ((d4 * q5_k_quant(blk, 4, j) - m4) * xb[128 + j]
                       + (d5 * q5_k_quant(blk, 5, j) - m5) * xb[160 + j])
                p3 += ((d6 * q5_k_quant(blk, 6, j) - m6) * xb[192 + j]
                       + (d7 * q5_k_quant(blk, 7, j) - m7) * xb[224 + j])
            acc += (p0 + p1) + (p2 + p3)
        out[r] = acc
    return out


def q6_k_exact(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for r in prange(raw.shape[0]):
        acc = np.float32(0.0)
        for b in range(len(x) // 256):
            blk, xb = raw[r, 210 * b:210 * b + 210], x[256 * b:256 * b + 256]
            for s in range(8):
                for j in range(32):
                    acc += q6_k_weight(blk, s, j) * xb[32 * s + j]
        out[r] = acc
    return out


def q6_k_fast(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for r in prange(raw.shape[0]):
        acc = np.float32(0.0)
        for b in range(len(x) // 256):
            blk, xb = raw[r, 210 * b:210 * b + 210], x[256 * b:256 * b + 256]
            p0 = p1 = p2 = p3 = np.float32(0.0)
            for j in range(32):
                p0 += q6_k_weight(blk, 0, j) * xb[j] + q6_k_weight(blk, 1, j) * xb[32 + j]
                p1 += q6_k_weight(blk, 2, j) * xb[64 + j] + q6_k_weight(blk, 3, j) * xb[96 + j]
                p2 += q6_k_weight(blk, 4, j) * xb[128 + j] + q6_k_weight(blk, 5, j) * xb[160 + j]
                p3 += q6_k_weight(blk, 6, j) * xb[192 + j] + q6_k_weight(blk, 7, j) * xb[224 + j]
            acc += (p0 + p1) + (p2 + p3)
        out[r] = acc
    return out


def int8_rows(weight, scaler, x):
    """weight [rows, cols] int8, scaler [rows] float32, x [cols] float32 -> w @ x [rows].

    gemma_pytorch's w = q * scaler[row] (quant.Int8Rows). One sum per row, left to right; the
    FAST build of this same loop splits it over SIMD lanes, as kernels.matvec does.
    """
    out = np.empty(weight.shape[0], np.float32)
    for r in prange(weight.shape[0]):
        acc = np.float32(0.0)
        for c in range(weight.shape[1]):
            acc += as_float(weight[r, c]) * scaler[r] * x[c]
        out[r] = acc
    return out


class Build:
    """One build (FAST or EXACT) of the kernels above: `ggml[type]` and `int8`."""

    def __init__(self, fastmath):
        self.fastmath = fastmath
        kernels = {Q8_0: (q8_0_fast, q8_0_exact), Q4_0: (q4_0_fast, q4_0_exact),
                   Q5_0: (q5_0_fast, q5_0_exact), Q4_K: (q4_k_fast, q4_k_exact),
                   Q5_K: (q5_k_fast, q5_k_exact), Q6_K: (q6_k_fast, q6_k_exact)}
        self.ggml = {t: _compile(fast if fastmath else exact, fastmath)
                     for t, (fast, exact) in kernels.items()}
        self.int8 = _compile(int8_rows, fastmath)


FAST = Build(fastmath=True)
EXACT = Build(fastmath=False)


# ----------------------------------------------------------------------------------------------
# Dispatch


def supports(w):
    """Whether a kernel here reads the quantized weight w (a quant.Quantized) as stored."""
    if isinstance(w, Int8Rows):
        return True
    return isinstance(w, GGMLBlocks) and int(w.ggml_type) in FAST.ggml


def matvec(w, x, exact=False):
    """w @ x for a quantized weight w [rows, cols] and x [cols] float32 -> [rows] float32.

    exact=False runs the FAST build, True the EXACT one (see the module docstring).
    """
    if not supports(w):
        raise ValueError(f"no quantized kernel reads a {getattr(w, 'kind', type(w).__name__)} "
                         f"weight; they read int8+scale and GGUF "
                         + ", ".join(NAMES.values()))
    x = np.asarray(x)
    if x.dtype != np.float32 or x.shape != (w.shape[1],):
        raise ValueError(f"x must be float32 of shape ({w.shape[1]},) for a {w.kind} weight of "
                         f"shape {w.shape}, got {x.dtype} {x.shape}")
    build = EXACT if exact else FAST
    if isinstance(w, Int8Rows):
        return build.int8(w.weight, w.scaler.astype(np.float32, copy=False), x)
    return build.ggml[int(w.ggml_type)](w.raw, x)


def matmul(w, x, exact=False):
    """x W^T for a quantized weight w [rows, cols] and x [B, cols] float32 -> [B, rows]: one
    matvec per token row, so the weights are read B times."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [B, {w.shape[1]}], got shape {x.shape}")
    return np.stack([matvec(w, row, exact) for row in x]).reshape(len(x), w.shape[0])


def warm_up(weights, exact=False):
    """Compile (or load from numba's cache) the kernels for the quantized weights among
    `weights` (an iterable of weights, as a model's weights.values())."""
    seen = set()
    for w in weights:
        if isinstance(w, (Int8Rows, GGMLBlocks)) and supports(w):
            one_row = w[:1]  # the same array types as w, so the same compiled kernel
            arrays = (one_row.weight, one_row.scaler) if isinstance(w, Int8Rows) else (one_row.raw,)
            key = (w.kind,) + tuple(numba.typeof(a) for a in arrays)
            if key not in seen:
                seen.add(key)
                matvec(one_row, np.zeros(w.shape[1], np.float32), exact)
