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
package) gives; tests/test_quant_kernels.py checks it bit for bit in both builds. Work is split
over output rows, never inside a sum, so no result depends on the number of threads.

Two builds, as in kernels.py (compiled by its `_compile`):
    EXACT  fastmath=False: each weight formed by gguf's float32 operations in gguf's order, each
           row's products w * x added left to right, one rounding per multiply and per add: the
           bits of summing the gguf-dequantized row times x in order, whatever the CPU. About
           ten times slower.
    FAST   the same weights, some formed by other operations that give the same float32
           (q - 8 in integers; the K-quants' (d * sc) * q - dmin * m in one fused multiply-add,
           as (d * sc) * q is exact), summed in 32 lanes (see "Sixteen lanes"): lane i of a row
           adds, block after block, weight i of each block of 32 (or of each sub-block of 32 of
           a K-quant super-block) times its x in a fused multiply-add; then the 32 lane sums are
           added in a fixed tree. Every operation is spelled out, none carries a fastmath flag:
           the bits do not depend on the CPU's vector width. For a prompt or a batch (several
           token rows), FAST forms each block's weights once for four tokens ("Four tokens"),
           each token's result the bits of its own matrix-vector product.

Shape legend: rows and cols of the [out, in] weight; B token rows.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import prange
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

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
# EXACT kernels: `<format>_exact(raw, x)` computes w @ x for the stored weights raw [rows, bytes]
# uint8 and x [cols] float32 -> [rows] float32, rows in parallel, each row's products added left
# to right.


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



def int8_rows(weight, scaler, x):
    """weight [rows, cols] int8, scaler [rows] float32, x [cols] float32 -> w @ x [rows].

    gemma_pytorch's w = q * scaler[row] (quant.Int8Rows). One sum per row, left to right.
    """
    out = np.empty(weight.shape[0], np.float32)
    for r in prange(weight.shape[0]):
        acc = np.float32(0.0)
        for c in range(weight.shape[1]):
            acc += as_float(weight[r, c]) * scaler[r] * x[c]
        out[r] = acc
    return out


# ----------------------------------------------------------------------------------------------
# Sixteen lanes
#
# The FAST kernels spell out their SIMD: a `Lanes` value is 16 numbers in one LLVM vector (one
# AVX-512 register, two AVX2 registers), and each operation below is one or two vector
# instructions. Left to LLVM's vectorizers, the same loops came out as gathers, scalar code or
# one long chain of dependent additions, depending on small changes of the source, and fastmath
# let LLVM reassociate a weight's own operations (d * (q * x) for (q * d) * x: not gguf's
# weight, which tests/test_quant_kernels.py now catches). Written out, every lane does exactly
# the IEEE operations listed: none carries a fastmath flag (numba's fastmath pass flags only
# operations that have none, so those here carry "arcp", which affects division only), and
# products are added with llvm.fma, one rounding on every CPU.


class Lanes(numba.types.Type):
    """16 float32 (FLOATS) or 16 bytes (BYTES) in SIMD lanes."""

    def __init__(self, element):
        self.element = element
        super().__init__(name=f"Lanes[16 x {element}]")


FLOATS, BYTES = Lanes(numba.types.float32), Lanes(numba.types.uint8)
_FLOAT16X = ir.VectorType(ir.FloatType(), 16)
_BYTE16X = ir.VectorType(ir.IntType(8), 16)
_INT16X = ir.VectorType(ir.IntType(32), 16)
_STRICT = ("arcp",)


@register_model(Lanes)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        be_type = _FLOAT16X if fe_type.element == numba.types.float32 else _BYTE16X
        super().__init__(dmm, fe_type, be_type)


def _splat(builder, value, vector_type):
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value,
                                 ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, one, ir.Constant(_INT16X, [0] * 16))


def _is_contiguous_1d(a, dtypes):
    return (isinstance(a, numba.types.Array) and a.ndim == 1 and a.layout == "C"
            and a.dtype in dtypes)


def _load16(typingctx, a, at, dtypes, lanes, vector_type, align):
    if not _is_contiguous_1d(a, dtypes) or not isinstance(at, numba.types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        start = context.cast(builder, args[1], signature.args[1], numba.types.intp)
        first = builder.gep(array.data, [start])
        return builder.load(builder.bitcast(first, vector_type.as_pointer()), align=align)

    return lanes(a, at), codegen


@intrinsic
def load_bytes(typingctx, a, at):
    """a[at:at + 16], a contiguous 1-D uint8 or int8 array, as BYTES."""
    return _load16(typingctx, a, at, (numba.types.uint8, numba.types.int8), BYTES, _BYTE16X, 1)


@intrinsic
def load_floats(typingctx, x, at):
    """x[at:at + 16], a contiguous 1-D float32 array, as FLOATS."""
    return _load16(typingctx, x, at, (numba.types.float32,), FLOATS, _FLOAT16X, 4)


@intrinsic
def prefetch(typingctx, a, at):
    """Ask the CPU to start reading a[at] (a contiguous 1-D array) into its caches (llvm.prefetch;
    at may be past the end: a prefetch never faults)."""
    if not (isinstance(a, numba.types.Array) and a.ndim == 1 and a.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        start = context.cast(builder, args[1], signature.args[1], numba.types.intp)
        address = builder.bitcast(builder.gep(array.data, [start]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [address.type] + [i32] * 3),
            "llvm.prefetch.p0")
        read, keep, data = (ir.Constant(i32, v) for v in (0, 3, 1))
        builder.call(fn, [address, read, keep, data])
        return context.get_dummy_value()

    return numba.types.none(a, at), codegen


@intrinsic
def lane_bits(typingctx, b, shift, width):
    """(b >> shift) & (2**width - 1) in each byte lane (as `bits`)."""
    if b != BYTES:
        return None

    def codegen(context, builder, signature, args):
        i8 = ir.IntType(8)
        shift, width = (builder.trunc(a, i8) for a in args[1:])
        mask = builder.sub(builder.shl(ir.Constant(i8, 1), width), ir.Constant(i8, 1))
        shifted = builder.lshr(args[0], _splat(builder, shift, _BYTE16X))
        return builder.and_(shifted, _splat(builder, mask, _BYTE16X))

    return BYTES(b, shift, width), codegen


@intrinsic
def lane_join(typingctx, low, high):
    """low | high << 4 in each byte lane (as `join`)."""
    if low != BYTES or high != BYTES:
        return None

    def codegen(context, builder, signature, args):
        four = ir.Constant(_BYTE16X, [4] * 16)
        return builder.or_(args[0], builder.shl(args[1], four))

    return BYTES(low, high), codegen


@intrinsic
def lane_minus(typingctx, b, n):
    """b - n in each byte lane, wrapping: read as int8 (lane_floats(..., True)), q - 8, q - 16
    or q - 32 of a quant q, exactly as the float32 q - n gguf computes."""
    if b != BYTES or not isinstance(n, numba.types.Integer):
        return None

    def codegen(context, builder, signature, args):
        n = _splat(builder, builder.trunc(args[1], ir.IntType(8)), _BYTE16X)
        return builder.sub(args[0], n)

    return BYTES(b, n), codegen


@intrinsic
def word_bits(typingctx, word, first):
    """Lane j: bit first + j of the uint32 `word` (first a literal 0 or 16), as a byte (0 or
    1): byte (first + j) // 8 of the word spread to lane j, tested against bit j % 8."""
    if word != numba.types.uint32 or not isinstance(first, numba.types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        byte = signature.args[1].literal_value // 8
        spread = builder.shuffle_vector(
            builder.bitcast(args[0], ir.VectorType(ir.IntType(8), 4)),
            ir.Constant(ir.VectorType(ir.IntType(8), 4), ir.Undefined),
            ir.Constant(_INT16X, [byte] * 8 + [byte + 1] * 8))
        bit = builder.and_(spread, ir.Constant(_BYTE16X, [1 << (j % 8) for j in range(16)]))
        return builder.zext(builder.icmp_unsigned("!=", bit, ir.Constant(_BYTE16X, [0] * 16)),
                            _BYTE16X)

    return BYTES(word, first), codegen


@intrinsic
def lane_floats(typingctx, b, signed):
    """Byte lanes -> float32, exactly: read as int8 if `signed` (a literal bool), else uint8."""
    if b != BYTES or not isinstance(signed, numba.types.BooleanLiteral):
        return None

    def codegen(context, builder, signature, args):
        if signature.args[1].literal_value:
            return builder.sitofp(builder.sext(args[0], _INT16X), _FLOAT16X)
        return builder.uitofp(builder.zext(args[0], _INT16X), _FLOAT16X)

    return FLOATS(b, signed), codegen


@intrinsic
def splat(typingctx, value):
    """A float32 in all 16 lanes."""
    if value != numba.types.float32:
        return None

    def codegen(context, builder, signature, args):
        return _splat(builder, args[0], _FLOAT16X)

    return FLOATS(value), codegen


@intrinsic
def splat_half(typingctx, lo, hi):
    """The float16 stored as bytes lo, hi (little-endian) -> float32, in all 16 lanes: `half`,
    spread before it is widened (a 16-bit broadcast and one 16-lane conversion)."""
    if lo != numba.types.uint8 or hi != numba.types.uint8:
        return None

    def codegen(context, builder, signature, args):
        i16 = ir.IntType(16)
        lo, hi = (builder.zext(a, i16) for a in args)
        bits = builder.or_(lo, builder.shl(hi, ir.Constant(i16, 8)))
        halves = builder.bitcast(_splat(builder, bits, ir.VectorType(i16, 16)),
                                 ir.VectorType(ir.HalfType(), 16))
        return builder.fpext(halves, _FLOAT16X)

    return FLOATS(lo, hi), codegen


@intrinsic
def zeros(typingctx):
    def codegen(context, builder, signature, args):
        return ir.Constant(_FLOAT16X, [0.0] * 16)

    return FLOATS(), codegen


def _strict(opname):
    """A float32 operation, on two FLOATS lane by lane or on two float32, rounded as IEEE says
    (no fastmath: LLVM may not reassociate it or fuse it into another operation)."""

    def typer(typingctx, a, b):
        if a != b or a not in (FLOATS, numba.types.float32):
            return None

        def codegen(context, builder, signature, args):
            return getattr(builder, opname)(*args, flags=_STRICT)

        return a(a, b), codegen

    return intrinsic(typer)


mul, add = _strict("fmul"), _strict("fadd")


@intrinsic
def muladd(typingctx, acc, w, x):
    """acc + w * x lane by lane, with one rounding (llvm.fma: on every CPU)."""
    if (acc, w, x) != (FLOATS, FLOATS, FLOATS):
        return None

    def codegen(context, builder, signature, args):
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_FLOAT16X, [_FLOAT16X] * 3), "llvm.fma.v16f32")
        acc, w, x = args
        return builder.call(fma, [w, x, acc])

    return FLOATS(acc, w, x), codegen


@intrinsic
def lanes_sum(typingctx, lo, hi):
    """The sum of 32 lanes in a fixed tree: lo + hi, then the upper half of the lanes onto the
    lower half, 16 -> 8 -> 4 -> 2 -> 1."""
    if lo != FLOATS or hi != FLOATS:
        return None

    def codegen(context, builder, signature, args):
        v = builder.fadd(*args, flags=_STRICT)
        n = 16
        while n > 1:
            n //= 2
            halves = [builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n),
                                                               list(range(k, k + n))))
                      for k in (0, n)]
            v = builder.fadd(*halves, flags=_STRICT)
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))

    return numba.types.float32(lo, hi), codegen


@intrinsic
def lane(typingctx, v, k):
    """Lane k of v in all 16 lanes."""
    if v != FLOATS or not isinstance(k, numba.types.Integer):
        return None

    def codegen(context, builder, signature, args):
        one = builder.extract_element(args[0], builder.trunc(args[1], ir.IntType(32)))
        return _splat(builder, one, _FLOAT16X)

    return FLOATS(v, k), codegen


@intrinsic
def k_scales_mins(typingctx, blk, d, dmin):
    """The 8 (d * sc) of a Q4_K or Q5_K super-block in lanes 0-7, its 8 -(dmin * m) in lanes 8-15:
    `k_scale_min` for the 8 sub-blocks at once. The 12 bytes k at 4 (see k_scale_min) are
    shuffled so that each lane holds the byte with its low bits (a) and the byte with its top 2
    bits (b), then sc or m = (a >> shift) & mask | (b >> 2) & top."""
    if not _is_contiguous_1d(blk, (numba.types.uint8,)):
        return None

    def codegen(context, builder, signature, args):
        block = context.make_array(signature.args[0])(context, builder, args[0])
        first = builder.gep(block.data, [context.get_constant(numba.types.intp, 4)])
        k = builder.load(builder.bitcast(first, _BYTE16X.as_pointer()), align=1)

        def shuffled(order):
            return builder.shuffle_vector(k, k, ir.Constant(_INT16X, order))

        def per_quarter(*values):
            return ir.Constant(_BYTE16X, [v for v in values for _ in range(4)])

        a = shuffled([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11])
        b = shuffled([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7])
        low = builder.and_(builder.lshr(a, per_quarter(0, 0, 0, 4)), per_quarter(63, 15, 63, 15))
        top = builder.and_(builder.lshr(b, per_quarter(2, 2, 2, 2)), per_quarter(0, 48, 0, 48))
        values = builder.uitofp(builder.zext(builder.or_(low, top), _INT16X), _FLOAT16X)
        d, dmin = (_splat(builder, value, _FLOAT16X) for value in args[1:])
        first_8_of_each = ir.Constant(_INT16X, list(range(8)) + list(range(16, 24)))
        scales = builder.shuffle_vector(d, dmin, first_8_of_each)
        products = builder.fmul(scales, values, flags=_STRICT)
        negate = ir.Constant(_FLOAT16X, [1.0] * 8 + [-1.0] * 8)  # exact
        return builder.fmul(products, negate, flags=_STRICT)

    return FLOATS(blk, d, dmin), codegen


# ----------------------------------------------------------------------------------------------
# FAST kernels: `<format>_fast(raw, x)`, as the EXACT ones. Each row has two accumulators, lo and
# hi: lane i of lo adds weight i of each block of 32 (or sub-block of 32 of a K-quant
# super-block) times its x, hi weight 16 + i. Each pass of the parallel loop takes two rows half
# the matrix apart (`row_pair`): each x load serves both, four chains of fused multiply-adds run
# at once (each waits ~4 cycles for the one before), and two far-apart streams keep more memory
# reads in flight (two adjacent rows read half as fast from memory, on Zen 4). A row's result
# does not depend on which row it is paired with. `<format>_lanes(blk, x, at, lo, hi)` adds one
# stored block blk, whose first weight multiplies x[at].


def accumulate(acc, w, x, at):
    """acc + w * x[at:at + 16], lane by lane, with one rounding (muladd): for one token (acc
    FLOATS, x [cols]), or for each of four (acc and x tuples of four: x[k] the k-th token's
    [cols]). Each token's lanes take the same operations either way (see "Four tokens")."""


@overload(accumulate, inline="always")
def _accumulate(acc, w, x, at):
    if acc == FLOATS:
        return lambda acc, w, x, at: muladd(acc, w, load_floats(x, at))
    if isinstance(acc, numba.types.UniTuple) and acc.dtype == FLOATS and acc.count == 4:
        return lambda acc, w, x, at: (muladd(acc[0], w, load_floats(x[0], at)),
                                      muladd(acc[1], w, load_floats(x[1], at)),
                                      muladd(acc[2], w, load_floats(x[2], at)),
                                      muladd(acc[3], w, load_floats(x[3], at)))
    return None


AHEAD = 1024  # bytes: how far ahead of the block being read `read_ahead` asks for a row


@numba.njit(inline="always")
def read_ahead(row, at, size):
    """Prefetch the `size` bytes of row at at + AHEAD, one 64-byte cache line at a time. The
    CPU's own prefetcher does not run far enough ahead in long rows: +20 % from memory on rows of
    16384 Q8_0 weights, measured on Zen 4."""
    for line in range(0, size, 64):
        prefetch(row, at + AHEAD + line)


@numba.njit(inline="always")
def row_pair(p, rows):
    """The two rows of pass p < (rows + 1) // 2: p and p + (rows + 1) // 2, or p twice if that
    is past the end (rows odd)."""
    near = np.int64(p)  # (prange's index may be unsigned: mixed with signed, numba makes floats)
    far = near + (rows + 1) // 2
    return near, far if far < rows else near


@numba.njit(inline="always")
def q8_0_lanes(blk, x, at, lo, hi):
    d = splat_half(blk[0], blk[1])
    lo = accumulate(lo, mul(lane_floats(load_bytes(blk, 2), True), d), x, at)
    hi = accumulate(hi, mul(lane_floats(load_bytes(blk, 18), True), d), x, at + 16)
    return lo, hi


def q8_0_fast(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for p in prange((raw.shape[0] + 1) // 2):
        r0, r1 = row_pair(p, raw.shape[0])
        lo0 = hi0 = lo1 = hi1 = zeros()
        for b in range(len(x) // 32):
            read_ahead(raw[r0], 34 * b, 34)
            read_ahead(raw[r1], 34 * b, 34)
            lo0, hi0 = q8_0_lanes(raw[r0, 34 * b:34 * b + 34], x, 32 * b, lo0, hi0)
            lo1, hi1 = q8_0_lanes(raw[r1, 34 * b:34 * b + 34], x, 32 * b, lo1, hi1)
        out[r0], out[r1] = lanes_sum(lo0, hi0), lanes_sum(lo1, hi1)
    return out


# Q4_0 and Q5_0: lo takes the low nibbles of the 16 quant bytes, hi the high nibbles. gguf:
# w = d * (q - 8), d * (q - 16).

@numba.njit(inline="always")
def q4_0_lanes(blk, x, at, lo, hi):
    d, qs = splat_half(blk[0], blk[1]), load_bytes(blk, 2)
    q_lo = lane_floats(lane_minus(lane_bits(qs, 0, 4), 8), True)
    q_hi = lane_floats(lane_minus(lane_bits(qs, 4, 4), 8), True)
    lo = accumulate(lo, mul(d, q_lo), x, at)
    hi = accumulate(hi, mul(d, q_hi), x, at + 16)
    return lo, hi


def q4_0_fast(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for p in prange((raw.shape[0] + 1) // 2):
        r0, r1 = row_pair(p, raw.shape[0])
        lo0 = hi0 = lo1 = hi1 = zeros()
        for b in range(len(x) // 32):
            read_ahead(raw[r0], 18 * b, 18)
            read_ahead(raw[r1], 18 * b, 18)
            lo0, hi0 = q4_0_lanes(raw[r0, 18 * b:18 * b + 18], x, 32 * b, lo0, hi0)
            lo1, hi1 = q4_0_lanes(raw[r1, 18 * b:18 * b + 18], x, 32 * b, lo1, hi1)
        out[r0], out[r1] = lanes_sum(lo0, hi0), lanes_sum(lo1, hi1)
    return out


@numba.njit(inline="always")
def q5_0_lanes(blk, x, at, lo, hi):
    d, qs = splat_half(blk[0], blk[1]), load_bytes(blk, 6)
    qh = np.uint32(blk[2] | blk[3] << 8 | blk[4] << 16 | blk[5] << 24)
    q_lo = lane_floats(lane_minus(lane_join(lane_bits(qs, 0, 4), word_bits(qh, 0)), 16), True)
    q_hi = lane_floats(lane_minus(lane_join(lane_bits(qs, 4, 4), word_bits(qh, 16)), 16), True)
    lo = accumulate(lo, mul(d, q_lo), x, at)
    hi = accumulate(hi, mul(d, q_hi), x, at + 16)
    return lo, hi


def q5_0_fast(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for p in prange((raw.shape[0] + 1) // 2):
        r0, r1 = row_pair(p, raw.shape[0])
        lo0 = hi0 = lo1 = hi1 = zeros()
        for b in range(len(x) // 32):
            read_ahead(raw[r0], 22 * b, 22)
            read_ahead(raw[r1], 22 * b, 22)
            lo0, hi0 = q5_0_lanes(raw[r0, 22 * b:22 * b + 22], x, 32 * b, lo0, hi0)
            lo1, hi1 = q5_0_lanes(raw[r1, 22 * b:22 * b + 22], x, 32 * b, lo1, hi1)
        out[r0], out[r1] = lanes_sum(lo0, hi0), lanes_sum(lo1, hi1)
    return out


# Q4_K and Q5_K: sub-blocks 2i and 2i + 1 share the quant bytes at 32i (low and high nibbles).
# gguf: w = (d * sc) * q - (dmin * m).

@numba.njit(inline="always")
def k_weights(sm, s, q):
    """The weights of quants q (BYTES) of sub-block s: (d * sc) * q - (dmin * m), in one fused
    multiply-add. The same float32 as gguf's two roundings: (d * sc) * q is exact (d has 11
    significant bits, sc 6 and q at most 5, 22 < 24), so only the subtraction rounds."""
    return muladd(lane(sm, 8 + s), lane(sm, s), lane_floats(q, False))


@numba.njit(inline="always")
def q4_k_16(blk, sm, i, half_, x, at, acc):
    """acc + weights 16 half_ .. 16 half_ + 15 of sub-blocks 2i and 2i + 1 times x; sm holds
    the super-block's scales and mins (k_scales_mins)."""
    qs = load_bytes(blk, 16 + 32 * i + 16 * half_)
    xa = at + 64 * i + 16 * half_
    acc = accumulate(acc, k_weights(sm, 2 * i, lane_bits(qs, 0, 4)), x, xa)
    return accumulate(acc, k_weights(sm, 2 * i + 1, lane_bits(qs, 4, 4)), x, xa + 32)


@numba.njit(inline="always")
def q4_k_lanes(blk, x, at, lo, hi):
    sm = k_scales_mins(blk, half(blk[0], blk[1]), half(blk[2], blk[3]))
    for i in range(4):
        lo = q4_k_16(blk, sm, i, 0, x, at, lo)
        hi = q4_k_16(blk, sm, i, 1, x, at, hi)
    return lo, hi


def q4_k_fast(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for p in prange((raw.shape[0] + 1) // 2):
        r0, r1 = row_pair(p, raw.shape[0])
        lo0 = hi0 = lo1 = hi1 = zeros()
        for b in range(len(x) // 256):
            read_ahead(raw[r0], 144 * b, 144)
            read_ahead(raw[r1], 144 * b, 144)
            lo0, hi0 = q4_k_lanes(raw[r0, 144 * b:144 * b + 144], x, 256 * b, lo0, hi0)
            lo1, hi1 = q4_k_lanes(raw[r1, 144 * b:144 * b + 144], x, 256 * b, lo1, hi1)
        out[r0], out[r1] = lanes_sum(lo0, hi0), lanes_sum(lo1, hi1)
    return out


# Q5_K: as Q4_K, with bit s of high-bit byte 16 + j as bit 4 of weight j of sub-block s.

@numba.njit(inline="always")
def q5_k_16(blk, sm, i, half_, x, at, acc):
    qs, qh = load_bytes(blk, 48 + 32 * i + 16 * half_), load_bytes(blk, 16 + 16 * half_)
    q0 = lane_join(lane_bits(qs, 0, 4), lane_bits(qh, 2 * i, 1))
    q1 = lane_join(lane_bits(qs, 4, 4), lane_bits(qh, 2 * i + 1, 1))
    xa = at + 64 * i + 16 * half_
    acc = accumulate(acc, k_weights(sm, 2 * i, q0), x, xa)
    return accumulate(acc, k_weights(sm, 2 * i + 1, q1), x, xa + 32)


@numba.njit(inline="always")
def q5_k_lanes(blk, x, at, lo, hi):
    sm = k_scales_mins(blk, half(blk[0], blk[1]), half(blk[2], blk[3]))
    for i in range(4):
        lo = q5_k_16(blk, sm, i, 0, x, at, lo)
        hi = q5_k_16(blk, sm, i, 1, x, at, hi)
    return lo, hi


def q5_k_fast(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for p in prange((raw.shape[0] + 1) // 2):
        r0, r1 = row_pair(p, raw.shape[0])
        lo0 = hi0 = lo1 = hi1 = zeros()
        for b in range(len(x) // 256):
            read_ahead(raw[r0], 176 * b, 176)
            read_ahead(raw[r1], 176 * b, 176)
            lo0, hi0 = q5_k_lanes(raw[r0, 176 * b:176 * b + 176], x, 256 * b, lo0, hi0)
            lo1, hi1 = q5_k_lanes(raw[r1, 176 * b:176 * b + 176], x, 256 * b, lo1, hi1)
        out[r0], out[r1] = lanes_sum(lo0, hi0), lanes_sum(lo1, hi1)
    return out


# Q6_K: in half h of the super-block, the quants of sub-blocks 4h, 4h + 1, 4h + 2, 4h + 3 are
# the low nibbles of bytes ql0 = 64h + j, ql1 = 64h + 32 + j, then their high nibbles, each with
# 2 bits of byte qh = 128 + 32h + j (bits 0-1, 2-3, 4-5, 6-7). Weights 16 half_ .. 16 half_ + 15
# of sub-block s share the int8 scale at 192 + 2s + half_. gguf: w = (d * sc) * (q - 32).

@numba.njit(inline="always")
def q6_k_weights(scales, at, low, high):
    """The weights of 16 quants low | high << 4 whose scale is lane `at` of scales."""
    q = lane_floats(lane_minus(lane_join(low, high), 32), True)
    return mul(lane(scales, at), q)


@numba.njit(inline="always")
def q6_k_64(blk, scales, h, half_, x, at, acc):
    """acc + weights 16 half_ .. 16 half_ + 15 of sub-blocks 4h .. 4h + 3 times x."""
    j = 16 * half_
    ql0, ql1 = load_bytes(blk, 64 * h + j), load_bytes(blk, 64 * h + 32 + j)
    qh = load_bytes(blk, 128 + 32 * h + j)
    xa, sc = at + 128 * h + j, 8 * h + half_  # x and scale of sub-block 4h
    acc = accumulate(acc, q6_k_weights(scales, sc, lane_bits(ql0, 0, 4), lane_bits(qh, 0, 2)),
                     x, xa)
    acc = accumulate(acc, q6_k_weights(scales, sc + 2, lane_bits(ql1, 0, 4), lane_bits(qh, 2, 2)),
                     x, xa + 32)
    acc = accumulate(acc, q6_k_weights(scales, sc + 4, lane_bits(ql0, 4, 4), lane_bits(qh, 4, 2)),
                     x, xa + 64)
    return accumulate(acc, q6_k_weights(scales, sc + 6, lane_bits(ql1, 4, 4),
                                        lane_bits(qh, 6, 2)), x, xa + 96)


@numba.njit(inline="always")
def q6_k_lanes(blk, x, at, lo, hi):
    scales = mul(splat(half(blk[208], blk[209])), lane_floats(load_bytes(blk, 192), True))
    lo = q6_k_64(blk, scales, 0, 0, x, at, lo)
    hi = q6_k_64(blk, scales, 0, 1, x, at, hi)
    lo = q6_k_64(blk, scales, 1, 0, x, at, lo)
    hi = q6_k_64(blk, scales, 1, 1, x, at, hi)
    return lo, hi


def q6_k_fast(raw, x):
    out = np.empty(raw.shape[0], np.float32)
    for p in prange((raw.shape[0] + 1) // 2):
        r0, r1 = row_pair(p, raw.shape[0])
        lo0 = hi0 = lo1 = hi1 = zeros()
        for b in range(len(x) // 256):
            read_ahead(raw[r0], 210 * b, 210)
            read_ahead(raw[r1], 210 * b, 210)
            lo0, hi0 = q6_k_lanes(raw[r0, 210 * b:210 * b + 210], x, 256 * b, lo0, hi0)
            lo1, hi1 = q6_k_lanes(raw[r1, 210 * b:210 * b + 210], x, 256 * b, lo1, hi1)
        out[r0], out[r1] = lanes_sum(lo0, hi0), lanes_sum(lo1, hi1)
    return out


# Int8Rows: w = q * scaler[row]. lo takes columns 32c + i, hi 32c + 16 + i; the last cols % 32
# columns are added after the lanes, in order, each product and sum rounded on its own.

@numba.njit(inline="always")
def int8_lanes(row, scale, x, at, lo, hi):
    lo = accumulate(lo, mul(lane_floats(load_bytes(row, at), True), scale), x, at)
    hi = accumulate(hi, mul(lane_floats(load_bytes(row, at + 16), True), scale), x, at + 16)
    return lo, hi


@numba.njit(inline="always")
def int8_row_end(row, scale, x, total):
    for c in range(len(x) - len(x) % 32, len(x)):
        total = add(total, mul(mul(as_float(row[c]), scale), x[c]))
    return total


def int8_rows_fast(weight, scaler, x):
    out = np.empty(weight.shape[0], np.float32)
    for p in prange((weight.shape[0] + 1) // 2):
        r0, r1 = row_pair(p, weight.shape[0])
        row0, row1, s0, s1 = weight[r0], weight[r1], scaler[r0], scaler[r1]
        lo0 = hi0 = lo1 = hi1 = zeros()
        for c in range(len(x) // 32):
            read_ahead(row0, 32 * c, 32)
            read_ahead(row1, 32 * c, 32)
            lo0, hi0 = int8_lanes(row0, splat(s0), x, 32 * c, lo0, hi0)
            lo1, hi1 = int8_lanes(row1, splat(s1), x, 32 * c, lo1, hi1)
        out[r0] = int8_row_end(row0, s0, x, lanes_sum(lo0, hi0))
        out[r1] = int8_row_end(row1, s1, x, lanes_sum(lo1, hi1))
    return out


# ----------------------------------------------------------------------------------------------
# Four tokens
#
# A prompt, or a step of several sequences, multiplies the same weights into several tokens.
# Token by token, each block would be read and dequantized once per token; here each block's
# weights are formed once, in registers, and multiplied into four tokens (x rows padded with
# zeros to a multiple of four; their results are dropped). Each token keeps the lo and hi
# accumulators of the one-token kernels above and adds the same products in the same order, so
# its result is the same bits as alone (tests/test_quant_kernels.py). One row per pass: eight
# accumulators, where a pair of rows would not fit in AVX2's sixteen registers.

@numba.njit(inline="always")
def four(x, t):
    """Tokens t .. t + 3 of x [B, cols], as a tuple of rows."""
    return x[t], x[t + 1], x[t + 2], x[t + 3]


SIZES = {Q8_0: (34, 32), Q4_0: (18, 32), Q5_0: (22, 32), Q4_K: (144, 256), Q5_K: (176, 256),
         Q6_K: (210, 256)}  # bytes and weights per block
LANES = {Q8_0: q8_0_lanes, Q4_0: q4_0_lanes, Q5_0: q5_0_lanes, Q4_K: q4_k_lanes,
         Q5_K: q5_k_lanes, Q6_K: q6_k_lanes}


def block_lanes(kind, blk, x, at, lo, hi):
    """The <format>_lanes of ggml type `kind` (a literal), chosen when the kernel compiles."""


@overload(block_lanes, inline="always")
def _block_lanes(kind, blk, x, at, lo, hi):
    if not isinstance(kind, numba.types.IntegerLiteral):
        return None  # typed again with the literal (numba.literally in the kernel)
    lanes = LANES[kind.literal_value]
    return lambda kind, blk, x, at, lo, hi: lanes(blk, x, at, lo, hi)


def block_size(kind):
    """(bytes, weights) of one block of ggml type `kind` (a literal), as constants."""


@overload(block_size, inline="always")
def _block_size(kind):
    if not isinstance(kind, numba.types.IntegerLiteral):
        return None
    size = SIZES[kind.literal_value]
    return lambda kind: size


# The row functions are compiled on their own, not inlined into the parallel kernels: numba's
# analysis of parallel loops takes tuples of lanes for array shapes and fails.

@numba.njit(no_cpython_wrapper=True)
def ggml_row_four_tokens(row, x, kind, out, r):
    """out[:, r] = row (the stored blocks of row r, ggml type `kind`, a literal) times every
    token of x [B, cols], four tokens at a time."""
    numba.literally(kind)
    nbytes, nweights = block_size(kind)
    for t in range(0, x.shape[0], 4):
        xs = four(x, t)
        lo = hi = (zeros(), zeros(), zeros(), zeros())
        for b in range(x.shape[1] // nweights):
            read_ahead(row, nbytes * b, nbytes)
            lo, hi = block_lanes(kind, row[nbytes * b:nbytes * (b + 1)], xs, nweights * b, lo, hi)
        out[t, r], out[t + 1, r] = lanes_sum(lo[0], hi[0]), lanes_sum(lo[1], hi[1])
        out[t + 2, r], out[t + 3, r] = lanes_sum(lo[2], hi[2]), lanes_sum(lo[3], hi[3])


# One parallel kernel per format, its type a constant (numba's cache keeps compiled code by the
# argument types: a kernel taking the type or the block reader as an argument would be typed or
# compiled again at every call or in every process).

def q8_0_four(raw, x):
    out = np.empty((x.shape[0], raw.shape[0]), np.float32)  # [B, rows]
    for r in prange(raw.shape[0]):
        ggml_row_four_tokens(raw[r], x, Q8_0, out, r)
    return out


def q4_0_four(raw, x):
    out = np.empty((x.shape[0], raw.shape[0]), np.float32)
    for r in prange(raw.shape[0]):
        ggml_row_four_tokens(raw[r], x, Q4_0, out, r)
    return out


def q5_0_four(raw, x):
    out = np.empty((x.shape[0], raw.shape[0]), np.float32)
    for r in prange(raw.shape[0]):
        ggml_row_four_tokens(raw[r], x, Q5_0, out, r)
    return out


def q4_k_four(raw, x):
    out = np.empty((x.shape[0], raw.shape[0]), np.float32)
    for r in prange(raw.shape[0]):
        ggml_row_four_tokens(raw[r], x, Q4_K, out, r)
    return out


def q5_k_four(raw, x):
    out = np.empty((x.shape[0], raw.shape[0]), np.float32)
    for r in prange(raw.shape[0]):
        ggml_row_four_tokens(raw[r], x, Q5_K, out, r)
    return out


def q6_k_four(raw, x):
    out = np.empty((x.shape[0], raw.shape[0]), np.float32)
    for r in prange(raw.shape[0]):
        ggml_row_four_tokens(raw[r], x, Q6_K, out, r)
    return out


@numba.njit(no_cpython_wrapper=True)
def int8_row_four_tokens(row, s, x, out, r):
    """out[:, r] = the int8 row r, scaled by s, times every token of x, four tokens at a time."""
    for t in range(0, x.shape[0], 4):
        xs = four(x, t)
        lo = hi = (zeros(), zeros(), zeros(), zeros())
        for c in range(x.shape[1] // 32):
            read_ahead(row, 32 * c, 32)
            lo, hi = int8_lanes(row, splat(s), xs, 32 * c, lo, hi)
        for k in range(4):
            out[t + k, r] = int8_row_end(row, s, x[t + k], lanes_sum(lo[k], hi[k]))


def int8_four_tokens(weight, scaler, x):
    """int8_rows_fast for x [B, cols] with B a multiple of 4 -> [B, rows]."""
    out = np.empty((x.shape[0], weight.shape[0]), np.float32)
    for r in prange(weight.shape[0]):
        int8_row_four_tokens(weight[r], scaler[r], x, out, r)
    return out


class Build:
    """One build (FAST or EXACT) of the kernels above: `ggml[type]` and `int8`; the FAST one also
    `ggml_four` and `int8_four`."""

    def __init__(self, fastmath):
        self.fastmath = fastmath
        kernels = {Q8_0: (q8_0_fast, q8_0_exact, q8_0_four),  # one token FAST, EXACT; four
                   Q4_0: (q4_0_fast, q4_0_exact, q4_0_four),
                   Q5_0: (q5_0_fast, q5_0_exact, q5_0_four),
                   Q4_K: (q4_k_fast, q4_k_exact, q4_k_four),
                   Q5_K: (q5_k_fast, q5_k_exact, q5_k_four),
                   Q6_K: (q6_k_fast, q6_k_exact, q6_k_four)}
        self.ggml = {t: _compile(fast if fastmath else exact, fastmath)
                     for t, (fast, exact, _) in kernels.items()}
        self.int8 = _compile(int8_rows_fast if fastmath else int8_rows, fastmath)
        if fastmath:
            self.ggml_four = {t: _compile(four, fastmath) for t, (_, _, four) in kernels.items()}
            self.int8_four = _compile(int8_four_tokens, fastmath)


FAST = Build(fastmath=True)
EXACT = Build(fastmath=False)


# ----------------------------------------------------------------------------------------------
# Dispatch


def supports(w):
    """Whether a kernel here reads the quantized weight w (a quant.Quantized) as stored."""
    if isinstance(w, Int8Rows):
        return True
    return isinstance(w, GGMLBlocks) and int(w.ggml_type) in FAST.ggml


def check(w, x):
    """w must be a weight a kernel here reads, and x a float32 row of its width. -> x as an array"""
    if not supports(w):
        raise ValueError(f"no quantized kernel reads a {getattr(w, 'kind', type(w).__name__)} "
                         f"weight; they read int8+scale and GGUF "
                         + ", ".join(NAMES.values()))
    x = np.asarray(x)
    if x.dtype != np.float32 or x.shape != (w.shape[1],):
        raise ValueError(f"x must be float32 of shape ({w.shape[1]},) for a {w.kind} weight of "
                         f"shape {w.shape}, got {x.dtype} {x.shape}")
    return x


def matvec(w, x, exact=False):
    """w @ x for a quantized weight w [rows, cols] and x [cols] float32 -> [rows] float32.

    exact=False runs the FAST build, True the EXACT one (see the module docstring).
    """
    x = check(w, x)
    build = EXACT if exact else FAST
    contiguous = np.ascontiguousarray  # FAST loads 16 lanes at a time (no copy if already so)
    x = contiguous(x)
    if isinstance(w, Int8Rows):
        return build.int8(contiguous(w.weight), w.scaler.astype(np.float32, copy=False), x)
    return build.ggml[int(w.ggml_type)](contiguous(w.raw), x)


def matmul(w, x, exact=False):
    """x W^T for a quantized weight w [rows, cols] and x [B, cols] float32 -> [B, rows].

    FAST with B > 1: the four-token kernels, which read each block once for all rows of x. EXACT,
    or one row: a matvec per row. Row b is the bits of matvec(w, x[b]) either way."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [B, {w.shape[1]}], got shape {x.shape}")
    if exact or len(x) == 1:
        return np.stack([matvec(w, row, exact) for row in x]).reshape(len(x), w.shape[0])
    check(w, x[0])
    B = len(x)
    padded = np.zeros((B + -B % 4, x.shape[1]), np.float32)  # [4k, cols]
    padded[:B] = x
    contiguous = np.ascontiguousarray
    if isinstance(w, Int8Rows):
        out = FAST.int8_four(contiguous(w.weight), w.scaler.astype(np.float32, copy=False),
                             padded)
    else:
        out = FAST.ggml_four[int(w.ggml_type)](contiguous(w.raw), padded)
    return out[:B]


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
                if not exact:  # EXACT runs several tokens as one matvec each
                    matmul(one_row, np.zeros((2, w.shape[1]), np.float32))  # four-token kernel
