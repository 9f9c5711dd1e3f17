"""The decode engine: new tokens through Gemma 1 on the numba kernels of kernels.py.

Generating text is one prefill of the prompt followed by one step per new token. A step is a
chain of matrix-vector products whose cost is reading every weight from memory once, so each
stage of Gemma.block runs as a kernel that reads the weights as stored:

    rms_norm -> qkv (one pass, three matrices) -> rope -> attention over the cache -> matmul o_proj
    rms_norm -> gate_up (one pass, two matrices; GELU) -> matmul down_proj   ... x L layers
    rms_norm -> matmul against the embedding (the logits)

The same chain runs several rows of tokens at once, each weight read once for all of them:
    Decoder.step_many   one new token for each of several sequences (their own KV caches, of
                        any lengths): a batch costs little more than one sequence;
    Decoder.prefill     the tokens of a prompt, PREFILL_CHUNK at a time: each weight read once
                        per chunk and multiplied into its tokens while in a register, where
                        Gemma.forward widens every matrix to float32 for BLAS.
A sequence's logits are the same bits whichever sequences share its steps (kernels.py), so a
batch generates exactly what each sequence would alone.

It computes what Gemma.forward computes, in the same KV cache, and is tested against it
(tests/test_decode.py); when they disagree, model.py is right. Weights are read as stored
(StoredKernels): bfloat16 and float32 by kernels.py, quantized blocks (GGUF, gemma_pytorch int8)
by quant_kernels.py. Weights no kernel reads (float16), float64 runs and Gemma 2 models go through
their forward.

Threads: steps give the same bits on any number of threads, so the count follows what measures
faster (ThreadCount): all cores when they are free, fewer when another process keeps one busy.

Shape legend: B token rows, D d_model, N query heads, K kv heads, H head_dim, V vocab.
"""

import time

import numba
import numpy as np

from . import kernels, quant_kernels
from .errors import GenerationError
from .model import Gemma, all_finite, embed, gelu_tanh, non_finite_error, rope_frequencies
from .quant import Quantized

KERNEL_DTYPES = (np.dtype(np.uint16), np.dtype(np.float32))  # bfloat16 bits, float32
# Prompt tokens per pass over the weights when prefilling. A pass multiplies each weight into
# every token while it is in a register; past ~128 tokens the activations no longer stay in
# cache between rows. Measured on the 2B shape (Zen 4, one core): 69, 91, 94, 88 and 63 GFLOP/s
# for 8, 32, 64, 128 and 256 tokens in one pass, against 95-100 for NumPy's sgemm; Gemma.forward
# (widening every matrix for BLAS) reached ~60 on a 512-token prompt.
PREFILL_CHUNK = 64
PREFILL_MAX_TOKENS = PREFILL_CHUNK  # the longest prompt prefilled in one pass (decode_gemma3.py)


class Decoder:
    """Runs new tokens for `model` on one build of the kernels.

    reproducible=False uses the FAST build (fastmath: sums split over SIMD lanes); True the EXACT
    build, whose sums run in source order whatever the CPU (about ten times slower). Either build
    gives the same bits for any number of threads and any batch. threads: None to follow what
    measures faster, up to numba's thread count when the Decoder is made (ThreadCount); a number
    to use that many.
    """

    def __init__(self, model, reproducible=False, threads=None):
        self.model = model
        self.kernels = StoredKernels(reproducible)
        self.on_kernels = isinstance(model, Gemma) and model.dtype == np.float32 and all(
            self.kernels.reads(w) for w in model.weights.values())
        if threads is not None and not (isinstance(threads, int) and
                                        1 <= threads <= numba.config.NUMBA_NUM_THREADS):
            raise GenerationError(f"threads must be None (follow the measurements) or 1.."
                                  f"{numba.config.NUMBA_NUM_THREADS}, got {threads!r}")
        self.threads = ThreadCount(numba.get_num_threads() if threads is None else threads,
                                   adapt=threads is None)
        if self.on_kernels:
            c = model.config
            self.inv_freq = rope_frequencies(c.head_dim, c.rope_base, np.float32)  # [H/2]

    def warm_up(self):
        """Compile (or load from numba's cache) the kernels for this model's stored weights."""
        if self.on_kernels:
            self.kernels.warm_up(self.model.weights.values())

    def step(self, token, cache):
        """Logits [V] float32 of the token after `token`, which goes in at position cache.length."""
        return self.step_many([token], [cache])[0]

    def step_many(self, tokens, caches):
        """One step of several sequences: tokens[b] goes in at position caches[b].length of its
        own cache (lengths may differ). -> logits [B, V] float32 of each next token."""
        check_step_caches(tokens, caches)
        if not self.on_kernels:
            return np.concatenate([self.model.forward([t], c) for t, c in zip(tokens, caches)])
        ids = self.model.check_tokens(tokens)
        caches = [self.model.check_cache(cache, 1) for cache in caches]
        starts = [cache.length for cache in caches]
        logits = forward_rows(self.model, self.kernels, self.inv_freq, self.threads, ids, caches,
                              [1] * len(caches))
        return self.refuse_non_finite(logits, [[t] for t in ids], caches, starts)

    def prefill(self, token_ids, cache):
        """Logits [V] of the last of token_ids, which continue `cache` (Gemma.forward's
        last_only), PREFILL_CHUNK tokens per pass over the weights."""
        tokens = self.model.check_tokens(token_ids)
        if not self.on_kernels:
            return self.model.forward(tokens, cache, last_only=True)[0]
        cache = self.model.check_cache(cache, len(tokens))
        start = cache.length
        for first in range(0, len(tokens), PREFILL_CHUNK):
            chunk = tokens[first:first + PREFILL_CHUNK]
            last = first + PREFILL_CHUNK >= len(tokens)
            logits = forward_rows(self.model, self.kernels, self.inv_freq, self.threads, chunk,
                                  [cache], [len(chunk)], logits=last)
        return self.refuse_non_finite(logits, [tokens], [cache], [start])[0]

    def prefill_many(self, prompts, caches):
        """prefill for several sequences, prompts[j] continuing caches[j]. -> logits [J, V]

        Prompts of up to PREFILL_CHUNK tokens run together, up to PREFILL_CHUNK tokens per pass;
        each row is the bits prefill(prompts[j], caches[j]) gives alone.
        """
        if len(prompts) != len(caches) or len({id(c) for c in caches}) != len(caches):
            raise GenerationError("prefill_many: needs one cache of its own per prompt")
        tokens = [self.model.check_tokens(p) for p in prompts]
        starts = [cache.length for cache in caches]
        logits = [None] * len(tokens)
        groups, alone = prompt_groups([len(t) for t in tokens], [self.on_kernels] * len(tokens))
        for j in alone:
            logits[j] = self.prefill(tokens[j], caches[j])
        for group in groups:
            batch = [self.model.check_cache(caches[j], len(tokens[j])) for j in group]
            rows = forward_rows(self.model, self.kernels, self.inv_freq, self.threads,
                                np.concatenate([tokens[j] for j in group]), batch,
                                [len(tokens[j]) for j in group])
            for j, row in zip(group, rows):
                logits[j] = row
        return self.refuse_non_finite(np.stack(logits), tokens, caches, starts)

    def refuse_non_finite(self, logits, prompts, caches, starts):
        """logits [J, V], unless a row holds a NaN or an infinity (never handed out silently):
        then every cache goes back to its start, and the NonFiniteError of the reference forward
        (model.py's non_finite_error) names the first layer where the values went wrong."""
        if all_finite(logits):
            return logits
        for cache, start in zip(caches, starts):
            cache.length = start
        j = next(j for j, row in enumerate(logits) if not all_finite(row))
        raise non_finite_error(self.model, prompts[j], caches[j], last_only=True)


def prompt_groups(lengths, fits):
    """Prompts of these lengths in groups to prefill together, PREFILL_CHUNK tokens at most per
    group, in order; those longer, or whose `fits` is False, go alone. -> (groups, alone), lists
    of prompt indices."""
    groups, alone = [[]], []
    for j, n in enumerate(lengths):
        if not fits[j] or n > PREFILL_CHUNK:
            alone.append(j)
            continue
        if sum(lengths[i] for i in groups[-1]) + n > PREFILL_CHUNK:
            groups.append([])
        groups[-1].append(j)
    return [g for g in groups if g], alone


def check_step_caches(tokens, caches):
    """step_many's arguments: one token per cache, each sequence with a cache of its own."""
    if len(tokens) != len(caches) or not tokens:
        raise GenerationError(f"step_many: needs one cache per token, got {len(tokens)} "
                              f"tokens and {len(caches)} caches")
    if len({id(cache) for cache in caches}) != len(caches):
        raise GenerationError("step_many: each sequence needs its own cache; a cache "
                              "appears twice")


class StoredKernels:
    """The kernels of one build (kernels.FAST or EXACT) for weights as stored: kernels.py's for
    bfloat16 (uint16 bits) and float32 arrays; for quantized ones (quant.py's Quantized: GGUF
    blocks, gemma_pytorch int8 rows), quant_kernels.py's matrix products, which turn each stored
    number into float32 in a register. The decode engines of Gemma 1 and 3 both run on it."""

    def __init__(self, reproducible=False):
        self.dense = kernels.EXACT if reproducible else kernels.FAST
        self.exact = reproducible
        self.rms_norm, self.rope = self.dense.rms_norm, self.dense.rope
        self.attention = self.dense.attention

    @staticmethod
    def reads(w):
        """Whether a kernel reads the stored weight w as it is."""
        if isinstance(w, Quantized):
            return quant_kernels.supports(w)
        return isinstance(w, np.ndarray) and w.dtype in KERNEL_DTYPES

    def matmul(self, w, x):
        """x W^T: x [B, in] float32, w [out, in] as stored -> [B, out]."""
        if isinstance(w, Quantized):
            return quant_kernels.matmul(w, x, exact=self.exact)
        return self.dense.matmul(w, x)

    def qkv(self, w_q, w_k, w_v, x):
        """The q, k, v projections of x [B, D]: one kernel pass for float weights."""
        if any(isinstance(w, Quantized) for w in (w_q, w_k, w_v)):
            return self.matmul(w_q, x), self.matmul(w_k, x), self.matmul(w_v, x)
        return self.dense.qkv(w_q, w_k, w_v, x)

    def gate_up(self, w_gate, w_up, y):
        """gelu_tanh(y W_gate^T) * (y W_up^T) for y [B, D] -> [B, F]."""
        if isinstance(w_gate, Quantized) or isinstance(w_up, Quantized):
            return gelu_tanh(self.matmul(w_gate, y)) * self.matmul(w_up, y)
        return self.dense.gate_up(w_gate, w_up, y)

    def warm_up(self, weights):
        """Compile (or load from numba's cache) the kernels for these stored weights."""
        weights = list(weights)
        for dtype in {w.dtype for w in weights if isinstance(w, np.ndarray)}:
            self.dense.warm_up(dtype)
        quant_kernels.warm_up(weights, exact=self.exact)


def forward_rows(model, k, inv_freq, threads, tokens, caches, counts, logits=True):
    """Gemma.forward on the kernels `k` for several sequences at once: sequence j's counts[j]
    tokens, consecutive in `tokens`, continue caches[j]. Each layer runs on the number of threads
    `threads` (a ThreadCount) chooses. -> logits [J, V] of each sequence's last token (None
    without `logits`: only the caches are filled)"""
    c, w = model.config, model.weights
    table = w["model.embed_tokens.weight"]
    starts = [cache.length for cache in caches]
    positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)])  # [B]
    h = embed(tokens, table, model.normalizer, np.float32)                     # [B, D]
    for i in range(c.n_layers):
        h = threads.run(lambda: block(model, k, inv_freq, i, h, positions, caches, starts, counts),
                        kind=len(tokens))
    for cache, start, n in zip(caches, starts, counts):
        cache.length = start + n
    if not logits:
        return None
    last = np.cumsum(counts) - 1                                               # [J]
    h = k.rms_norm(h[last], w["model.norm.weight"], c.norm_eps)
    return threads.run(lambda: k.matmul(table[:c.n_real_tokens], h), kind=None)  # [J, V]


def block(model, k, inv_freq, i, h, positions, caches, starts, counts):
    """Gemma.block i for B token rows of several sequences: each sequence's keys and values join
    its own cache at its own positions, and its queries attend to its cache alone. -> h [B, D]"""
    c, eps = model.config, model.config.norm_eps
    lw = lambda name: model.weights[f"model.layers.{i}.{name}.weight"]
    B, N, K, H = len(h), c.n_heads, c.n_kv_heads, c.head_dim
    x = k.rms_norm(h, lw("input_layernorm"), eps)
    q, key, v = k.qkv(lw("self_attn.q_proj"), lw("self_attn.k_proj"), lw("self_attn.v_proj"), x)
    q = k.rope(q.reshape(B, N, H), positions, inv_freq)                        # [B, N, H]
    key = k.rope(key.reshape(B, K, H), positions, inv_freq)                    # [B, K, H]
    v = v.reshape(B, K, H)
    o = np.empty((B, N * H), np.float32)
    row = 0
    for cache, start, n in zip(caches, starts, counts):
        cache.k[i, start:start + n], cache.v[i, start:start + n] = key[row:row + n], v[row:row + n]
        o[row:row + n] = k.attention(q[row:row + n], cache.k[i, :start + n],
                                     cache.v[i, :start + n], start)
        row += n
    h = h + k.matmul(lw("self_attn.o_proj"), o)
    y = k.rms_norm(h, lw("post_attention_layernorm"), eps)
    return h + k.matmul(lw("mlp.down_proj"), k.gate_up(lw("mlp.gate_proj"), lw("mlp.up_proj"), y))


class ThreadCount:
    """How many threads the next layer runs on: the count that measured faster.

    With every core free, two threads read memory faster than one; when another process keeps a
    core busy, the thread sharing that core runs at half speed or less, every parallel stage waits
    for it, and one thread is faster. So each layer is timed (the layers of a model cost the same:
    a trial costs a few layers, not whole steps), and every so often RUNS layers run on a
    neighbouring count (one fewer or one more); if their median time beats the median of the
    last RUNS layers by 10 %, that count is kept. Times are compared only between runs of the
    same kind (the same number of token rows), and medians shrug off a run that lost its core for
    a moment. A run much slower than its kind's recent median starts RUNS new ones; if their
    median confirms it (a process arrived), a trial follows at once. A trial that loses doubles
    the wait before the next (quadruples it if it was far slower). Results are the same bits on
    any count (kernels.py), so trying costs only time.
    """

    FIRST_WAIT, LONGEST_WAIT = 4, 256  # runs between trials
    RUNS = 3                           # runs per median: of a trial, and of the recent past
    SLOWER = 1.5                       # a run this much slower than the recent median: a change

    def __init__(self, most, adapt=True):
        self.most, self.adapt = most, adapt
        self.current = most
        self.recent = {}               # kind -> seconds of its last RUNS runs on `current`
        self.trial = None              # (count, kind, [seconds]) of the trial under way
        self.wait = self.gap = self.FIRST_WAIT
        self.lower_next = True         # which neighbour the next trial tries
        self.before = None             # the recent median before a run much slower than it

    def run(self, work, kind):
        """work() on the chosen number of threads (numba's count is restored afterwards), timed
        as a run of `kind` (None: not timed)."""
        n = self.current if kind is None else self.choose(kind)
        before = numba.get_num_threads()
        numba.set_num_threads(n)
        try:
            start = time.perf_counter()
            result = work()
            seconds = time.perf_counter() - start
        finally:
            numba.set_num_threads(before)
        if kind is not None:
            self.record(n, seconds, kind)
        return result

    def choose(self, kind):
        if self.trial is not None:
            if kind == self.trial[1]:
                return self.trial[0]
            self.trial, self.wait = None, self.gap  # another kind of work: try again later
        if not self.adapt or self.most == 1 or self.wait > 0 \
                or len(self.recent.get(kind, ())) < self.RUNS:
            return self.current
        lower, higher = self.current - 1, self.current + 1
        count = lower if higher > self.most or (self.lower_next and lower >= 1) else higher
        self.lower_next = not self.lower_next
        self.trial = (count, kind, [])
        return count

    def record(self, n, seconds, kind):
        if self.trial is not None and (n, kind) == self.trial[:2]:
            times = self.trial[2]
            times.append(seconds)
            if len(times) < self.RUNS:
                return
            ratio = np.median(times) / np.median(self.recent[kind])
            if ratio < 0.9:  # clearly faster: keep it
                self.current, self.recent, self.gap = n, {kind: times}, self.FIRST_WAIT
                self.before = None
            else:  # a trial far slower than the current count waits longer before the next
                self.gap = min((4 if ratio > self.SLOWER else 2) * self.gap, self.LONGEST_WAIT)
            self.trial, self.wait = None, self.gap
            return
        recent = self.recent.setdefault(kind, [])
        if len(recent) == self.RUNS and self.before is None \
                and seconds > self.SLOWER * np.median(recent):
            self.before = np.median(recent)  # the machine may have changed: measure it afresh
            recent.clear()
        recent.append(seconds)
        del recent[:-self.RUNS]
        self.wait -= 1
        if self.before is not None and len(recent) == self.RUNS:
            if np.median(recent) > self.SLOWER * self.before:  # it did: try the neighbours now
                self.wait = 0
            self.before = None
