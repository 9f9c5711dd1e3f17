"""Read bandwidth of the quantized matvec kernels (minigemma/quant_kernels.py, FAST build) against
the machine's memory-bandwidth probe (minigemma.bench.worker_probe), in one run.

    python scripts/bench_quant_kernels.py [--reps 5] [--types Q8_0,Q4_K,...] [--threads 1,2]

For each format and each 2B-sized shape ([16384, 2048] as gate/up_proj, [2048, 16384] as
down_proj) it times w @ x over enough copies of the matrix (at least 256 MB in all) that every
call reads its weights from memory, not from the caches, and prints the stored bytes read per
second, best of --reps passes, and that as a % of the probe's best reading. A kernel that keeps
up with memory is near 100 %. The "cached" column reads the first 2 MB of rows of one copy over
and over, from the caches: a kernel whose cached rate is below the probe is compute-bound here. The
bf16 row is kernels.matmul on bfloat16 weights (one token), for comparison.

The weights are random bytes made valid blocks (finite float16 scales): their values do not
change the time. The probe allocates 1 GB; in all the run stays under ~1.5 GB.
"""

import argparse
import math
import time

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from minigemma import kernels, quant_kernels
from minigemma.bench import worker_probe
from minigemma.quant import GGMLBlocks, Int8Rows

TYPES = ("bf16", "int8", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K")  # bf16: kernels.matmul
SHAPES = ((16384, 2048), (2048, 16384))
COPIES_BYTES = 256e6  # 8 x the 32 MB L3 of the machine this was written on
CACHED_BYTES = 2e6    # rows read over and over for the "cached" column
SCALE_BYTES = {"Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2),
               "Q6_K": (208,)}  # where each block holds its float16 scales


def random_weight(kind, rows, cols, rng):
    """A weight of `kind` and shape [rows, cols] with random contents: bfloat16 bits (uint16),
    or a quant.Quantized."""
    if kind == "bf16":
        return rng.integers(0x3000, 0x4000, (rows, cols), dtype=np.uint16)
    if kind == "int8":
        return Int8Rows(rng.integers(-128, 128, (rows, cols), dtype=np.int8),
                        rng.random(rows, dtype=np.float32))
    ggml_type = GGMLQuantizationType[kind]
    weights_per_block, bytes_per_block = GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, (rows, cols // weights_per_block, bytes_per_block), np.uint8)
    for at in SCALE_BYTES[kind]:
        scales = rng.random(blocks.shape[:2], dtype=np.float32).astype(np.float16)
        blocks[:, :, at:at + 2] = scales[..., None].view(np.uint8)
    return GGMLBlocks(blocks.reshape(rows, -1), ggml_type)


def best_seconds(weights, x, reps):
    """Best time of one kernel call, over `reps` passes through every weight in `weights`."""
    if isinstance(weights[0], np.ndarray):
        matvec = lambda w, x: kernels.FAST.matmul(w, x[None])[0]  # one token  # noqa: E731
    else:
        matvec = quant_kernels.matvec
    matvec(weights[0], x)  # compile, or load from numba's cache
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        for w in weights:
            matvec(w, x)
        best = min(best, (time.perf_counter() - start) / len(weights))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--threads", default=f"1,{numba.config.NUMBA_NUM_THREADS}",
                        help="thread counts to measure, comma-separated")
    args = parser.parse_args()
    kinds, counts = args.types.split(","), sorted({int(n) for n in args.threads.split(",")})
    if unknown := sorted(set(kinds) - set(TYPES)):
        parser.error(f"--types: unknown {unknown}; choose from {','.join(TYPES)}")
    if not all(1 <= n <= numba.config.NUMBA_NUM_THREADS for n in counts):
        parser.error(f"--threads: each count must be 1..{numba.config.NUMBA_NUM_THREADS}")
    rng = np.random.default_rng(0)

    probes = {n: [] for n in counts}
    measure_probes(probes)
    results = {}  # (kind, shape, threads) -> bytes per second (from memory, cached)
    for kind in kinds:
        for rows, cols in SHAPES:
            one = random_weight(kind, rows, cols, rng)
            weights = [one] + [random_weight(kind, rows, cols, rng)
                               for _ in range(math.ceil(COPIES_BYTES / one.nbytes) - 1)]
            x = rng.standard_normal(cols, dtype=np.float32)
            cached = [one[:max(4, int(CACHED_BYTES * rows / one.nbytes))]] * 20
            for n in counts:
                numba.set_num_threads(n)
                results[kind, (rows, cols), n] = (
                    one.nbytes / best_seconds(weights, x, args.reps),
                    cached[0].nbytes / best_seconds(cached, x, args.reps))
            del weights
    measure_probes(probes)

    best_probe = {n: max(p["gb_s_max"] for p in probes[n]) for n in counts}
    print(f"{cpu_name()}; memory probe, best of {2 * 10} readings: "
          + ", ".join(f"{best_probe[n]:.1f} GB/s on {n} thread{'s' * (n > 1)}" for n in counts))
    print(f"{'':23s}" + "".join(f"{f'--- {n} thread(s): GB/s ---':>30s}" for n in counts))
    print(f"{'format':8s} {'shape':>14s}" + f"{'memory':>11s} {'% probe':>8s} {'cached':>9s}"
          * len(counts))
    for kind in kinds:
        for shape in SHAPES:
            cells = [results[kind, shape, n] for n in counts]
            print(f"{kind:8s} {str(list(shape)):>14s}" + "".join(
                f"{memory / 1e9:11.1f} {100 * memory / 1e9 / best_probe[n]:7.0f}% "
                f"{cached / 1e9:9.1f}" for n, (memory, cached) in zip(counts, cells)))


def measure_probes(probes):
    """One probe reading (10 passes over 1 GB) per thread count, into probes[count]."""
    for n in probes:
        numba.set_num_threads(n)
        probes[n].append(worker_probe(None))


def cpu_name():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                    "unknown CPU")


if __name__ == "__main__":
    main()
