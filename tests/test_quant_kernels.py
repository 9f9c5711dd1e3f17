"""The quantized matvec kernels (quant_kernels.py) against the gguf package's own dequantizer.

Weights: Q8_0, Q4_0 and Q5_0 blocks are written by the gguf package's quantizer
(gguf.quants.quantize, llama.cpp's Python package) from seeded random float32 rows. It cannot
quantize the K-quants, so Q4_K, Q5_K and Q6_K blocks are random bytes made valid: every bit
pattern of their quants, 6-bit scales and mins and int8 scales is a valid block; their float16
scales are set to finite values (including zeros, subnormals and negatives). Int8Rows are random
int8 with random float32 scalers. The arrays are read-only, as memory-mapped files are.

References: the weight rows as gguf.quants.dequantize gives them (quant.GGMLBlocks.dequantize;
Int8Rows.dequantize for int8), multiplied by x in float32. EXACT must give the bits of the
float32 sum of those products left to right (np.cumsum adds in order). FAST must be within
1e-6 * sqrt(cols) * sum|w x| of the float64 sum of the same products, the float32 rounding of
a sum of cols terms; a wrong quant, scale or block would be off by order sum|w x|. FAST's
weights are checked bit for bit with an x that is zero but at one column: the sum is then the
one product w * x[c], rounded once whatever the order of the additions. FAST's sums are checked
to give the same bits when compiled for other x86 CPUs (AVX2; AVX without FMA) in subprocesses.
"""

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize

from minigemma import quant_kernels
from minigemma.quant import GGMLBlocks, Int8Rows

needs_two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                                       reason="numba has a single thread on this machine")

QUANTIZED_BY_GGUF = ("Q8_0", "Q4_0", "Q5_0")
RANDOM_BLOCKS = ("Q4_K", "Q5_K", "Q6_K")
FLOAT16_SCALES_AT = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets in a block
# (rows, cols): odd row counts; blocks of 32 with a multiple of 256 weights, a tail of single
# blocks after one, and a tail alone; K-quants of one and of several super-blocks
SHAPES = {"blocks of 32": [(13, 768), (7, 288), (3, 32), (1, 2048)],
          "super-blocks": [(13, 512), (3, 256), (1, 2048)]}


def read_only(array):
    array.flags.writeable = False
    return array


def random_scales(rng, shape):
    """Finite float16 values of every kind: normal, large, tiny (subnormal), zero, negative."""
    values = rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 3, shape)
    values[rng.random(shape) < 0.05] = 0.0
    return values.astype(np.float16)


def gguf_quantized(name, rows, cols, rng):
    """Blocks written by gguf's quantizer from random rows of different magnitudes."""
    ggml_type = GGMLQuantizationType[name]
    w = rng.standard_normal((rows, cols), dtype=np.float32) * rng.random((rows, 1), np.float32)
    return GGMLBlocks(read_only(quantize(w, ggml_type)), ggml_type)


def random_blocks(name, rows, cols, rng):
    """Random bytes as valid K-quant blocks: float16 scale fields set to finite values."""
    ggml_type = GGMLQuantizationType[name]
    weights_per_block, bytes_per_block = GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, (rows, cols // weights_per_block, bytes_per_block), np.uint8)
    for at in FLOAT16_SCALES_AT[name]:
        blocks[:, :, at:at + 2] = random_scales(rng, blocks.shape[:2])[..., None].view(np.uint8)
    return GGMLBlocks(read_only(blocks.reshape(rows, -1)), ggml_type)


def int8_rows(rows, cols, rng):
    return Int8Rows(read_only(rng.integers(-128, 128, (rows, cols), dtype=np.int8)),
                    read_only(rng.random(rows, dtype=np.float32) * np.float32(0.01)))


def weight(name, rows, cols, seed):
    rng = np.random.default_rng(seed)
    if name == "int8":
        return int8_rows(rows, cols, rng)
    make = gguf_quantized if name in QUANTIZED_BY_GGUF else random_blocks
    return make(name, rows, cols, rng)


def cases():
    for name in QUANTIZED_BY_GGUF:
        yield from ((name, shape) for shape in SHAPES["blocks of 32"])
    for name in RANDOM_BLOCKS:
        yield from ((name, shape) for shape in SHAPES["super-blocks"])
    yield from (("int8", shape) for shape in [(13, 300), (2, 2048)])


CASES = list(cases())
IDS = [f"{name}-{rows}x{cols}" for name, (rows, cols) in CASES]


def products(w, x):
    """The float32 products of the dequantized rows and x, as gguf defines the weights."""
    wide = w.dequantize()
    assert wide.dtype == np.float32 and wide.shape == w.shape
    return wide * x


@pytest.mark.parametrize("name,shape", CASES, ids=IDS)
def test_exact_is_the_sum_of_gguf_weights_times_x_in_order(name, shape):
    w = weight(name, *shape, seed=shape[0] * shape[1])
    x = np.random.default_rng(1).standard_normal(shape[1], dtype=np.float32)
    in_order = np.cumsum(products(w, x), axis=1, dtype=np.float32)[:, -1]  # cumsum adds in order
    np.testing.assert_array_equal(quant_kernels.matvec(w, x, exact=True), in_order)


@pytest.mark.parametrize("name,shape", CASES, ids=IDS)
def test_fast_is_within_float32_rounding_of_the_sum(name, shape):
    w = weight(name, *shape, seed=shape[0] * shape[1])
    x = np.random.default_rng(2).standard_normal(shape[1], dtype=np.float32)
    terms = products(w, x).astype(np.float64)
    fast = quant_kernels.matvec(w, x)
    assert fast.dtype == np.float32 and fast.shape == (shape[0],)
    bound = 1e-6 * np.sqrt(shape[1]) * np.abs(terms).sum(axis=1)
    np.testing.assert_array_less(np.abs(fast - terms.sum(axis=1)), bound + 1e-30)


@pytest.mark.parametrize("name", QUANTIZED_BY_GGUF + RANDOM_BLOCKS)
def test_every_byte_of_a_block_is_read_where_gguf_reads_it(name):
    """Change one byte of a block at a time (every offset: scales, packed scales, high bits,
    quants): the kernel still gives the bits of gguf's weights, so no byte is misplaced."""
    weights_per_block, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    base = weight(name, 1, weights_per_block, seed=8).raw.copy()
    for at in FLOAT16_SCALES_AT.get(name, ()):  # scales of ordinary size, not zero or tiny
        base[0, at:at + 2] = np.array([0.75], np.float16).view(np.uint8)
    x = np.random.default_rng(8).standard_normal(weights_per_block, dtype=np.float32)
    exact = quant_kernels.EXACT.ggml[int(GGMLQuantizationType[name])]
    before = exact(base, x)
    changed = 0
    for offset in range(bytes_per_block):
        raw = base.copy()
        raw[0, offset] ^= 0x25
        w = GGMLBlocks(raw, GGMLQuantizationType[name])
        in_order = np.cumsum(products(w, x), axis=1, dtype=np.float32)[:, -1]
        np.testing.assert_array_equal(exact(raw, x), in_order, err_msg=f"byte {offset}")
        changed += not np.array_equal(in_order, before)
    assert changed >= bytes_per_block - 2  # nearly every byte changes the sum: the test can fail


@pytest.mark.parametrize("name", QUANTIZED_BY_GGUF + RANDOM_BLOCKS + ("int8",))
def test_fast_forms_each_weight_as_gguf_does(name):
    """x = v at column c, zero elsewhere: FAST must give the float32 product of gguf's weight
    and v, for every column (a weight formed otherwise would round differently)."""
    w = weight(name, 3, 256 + 32 * (name in QUANTIZED_BY_GGUF) + 12 * (name == "int8"), seed=11)
    wide = w.dequantize()
    values = np.random.default_rng(11).standard_normal(w.shape[1], dtype=np.float32)
    for c, v in enumerate(values):
        x = np.zeros(w.shape[1], np.float32)
        x[c] = v
        np.testing.assert_array_equal(quant_kernels.matvec(w, x), wide[:, c] * v,
                                      err_msg=f"column {c}")


def fast_results():
    """FAST w @ x for a weight of each format, concatenated (also run by other_cpu_results)."""
    results = []
    for i, name in enumerate(QUANTIZED_BY_GGUF + RANDOM_BLOCKS + ("int8",)):
        w = weight(name, 37, 512 + 12 * (name == "int8"), seed=i)
        x = np.random.default_rng(i).standard_normal(w.shape[1], dtype=np.float32)
        results.append(quant_kernels.matvec(w, x))
        results.append(quant_kernels.matmul(w, np.stack([-x, x, 2 * x]))[1])  # four-token kernel
    return np.concatenate(results)


def other_cpu_results(cpu, tmp_path):
    """fast_results() compiled by numba for another CPU (LLVM's name for it), in a subprocess."""
    out = tmp_path / f"{cpu}.npy"
    tests, repository = Path(__file__).parent, Path(__file__).parent.parent
    script = (f"import sys; sys.path[:0] = [{str(tests)!r}, {str(repository)!r}]; import numpy; "
              f"from test_quant_kernels import fast_results; numpy.save({str(out)!r}, "
              f"fast_results())")
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="",
               NUMBA_CACHE_DIR=str(tmp_path / f"cache-{cpu}"))
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    return np.load(out)


def host_has(flags):
    try:
        with open("/proc/cpuinfo") as f:
            words = f.read().split()
    except OSError:
        return False
    return all(flag in words for flag in flags)


@pytest.mark.skipif(not host_has(["avx2", "fma", "f16c"]),
                    reason="needs an x86 CPU that runs AVX2 code (and /proc/cpuinfo to tell)")
def test_fast_gives_the_same_bits_on_other_cpus(tmp_path):
    """FAST spells out its lanes and fused multiply-adds: builds for AVX2 (8 lanes a register)
    and for AVX without FMA (llvm.fma through the C library) give this CPU's bits."""
    here = fast_results()
    for cpu in ("haswell", "ivybridge"):
        np.testing.assert_array_equal(other_cpu_results(cpu, tmp_path), here, err_msg=cpu)


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("name", QUANTIZED_BY_GGUF + RANDOM_BLOCKS + ("int8",))
def test_a_slice_of_rows_reads_those_rows(name, exact):
    """Rows are computed two at a time; a row's bits must not depend on its partner."""
    w = weight(name, 11, 512, seed=3)
    x = np.random.default_rng(3).standard_normal(512, dtype=np.float32)
    whole = quant_kernels.matvec(w, x, exact)
    for start, stop in [(4, 9), (3, 8), (5, 6)]:
        np.testing.assert_array_equal(quant_kernels.matvec(w[start:stop], x, exact),
                                      whole[start:stop])


@needs_two_threads
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_results_identical_for_one_and_two_threads(exact):
    names = QUANTIZED_BY_GGUF + RANDOM_BLOCKS + ("int8",)
    weights = [weight(name, 37, 512, seed=i) for i, name in enumerate(names)]
    x = np.random.default_rng(4).standard_normal(512, dtype=np.float32)
    try:
        numba.set_num_threads(1)
        one = [quant_kernels.matvec(w, x, exact) for w in weights]
        numba.set_num_threads(2)
        two = [quant_kernels.matvec(w, x, exact) for w in weights]
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for name, a, b in zip(names, one, two):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("name", QUANTIZED_BY_GGUF + RANDOM_BLOCKS + ("int8",))
def test_several_tokens_give_each_token_the_bits_of_a_matvec(name, exact):
    """matmul forms each block's weights once for four tokens (FAST); every token's row is still
    the bits of its own matvec, for any number of tokens (padded to a multiple of four)."""
    w = weight(name, 13, 512 + 12 * (name == "int8"), seed=5)
    x = np.random.default_rng(5).standard_normal((9, w.shape[1]), dtype=np.float32)
    alone = np.stack([quant_kernels.matvec(w, row, exact) for row in x])
    for B in (2, 3, 4, 5, 9):
        out = quant_kernels.matmul(w, x[:B], exact)
        assert out.shape == (B, 13)
        np.testing.assert_array_equal(out, alone[:B], err_msg=f"{B} tokens")


def test_supports_says_which_weights_have_a_kernel():
    rng = np.random.default_rng(6)
    q4_1 = GGMLBlocks(quantize(rng.standard_normal((2, 64), dtype=np.float32),
                               GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    assert quant_kernels.supports(weight("Q4_K", 1, 256, seed=6))
    assert quant_kernels.supports(weight("int8", 1, 8, seed=6))
    assert not quant_kernels.supports(q4_1)
    with pytest.raises(ValueError, match="GGUF Q4_1"):
        quant_kernels.matvec(q4_1, np.zeros(64, np.float32))


@pytest.mark.parametrize("x", [np.zeros(256, np.float64), np.zeros(255, np.float32),
                               np.zeros((1, 256), np.float32)], ids=["float64", "short", "2-D"])
def test_a_wrong_x_is_a_clear_error(x):
    with pytest.raises(ValueError, match=r"x must be float32 of shape \(256,\)"):
        quant_kernels.matvec(weight("Q8_0", 2, 256, seed=7), x)


def test_warm_up_compiles_for_the_quantized_weights_and_skips_the_others():
    weights = [weight("Q4_K", 3, 256, seed=9), weight("Q4_K", 5, 256, seed=10),
               weight("int8", 2, 16, seed=9), np.zeros((2, 8), np.uint16)]
    for exact in (False, True):
        quant_kernels.warm_up(weights, exact)
        build = quant_kernels.EXACT if exact else quant_kernels.FAST
        assert build.ggml[quant_kernels.Q4_K].signatures and build.int8.signatures
    fast = quant_kernels.FAST
    assert fast.ggml_four[quant_kernels.Q4_K].signatures and fast.int8_four.signatures


def test_format_numbers_are_those_of_gguf_files():
    """quant_kernels names the formats by number, without importing the optional gguf package."""
    for number, name in quant_kernels.NAMES.items():
        assert GGMLQuantizationType[name] == number
