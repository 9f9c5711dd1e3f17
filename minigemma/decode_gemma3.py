"""The decode engine of Gemma 3 (gemma3.py): new tokens on numba kernels.

As decode.py does for Gemma 1, a step runs each stage of Gemma3.block as a kernel that reads the
weights as stored: kernels.py's for float32 and bfloat16 weights, quant_kernels.py's for
quantized ones (GGUF blocks, gemma_pytorch int8), so the built-in 270M's Q4_K, Q5_0, Q6_K and
Q8_0 matrices are never widened whole:

    rms_norm -> q, k, v -> QK-norm -> rope (the layer's base) -> attention over the layer's cache
             -> o_proj -> rms_norm -> + residual
    rms_norm -> gate, up, GELU -> down_proj -> rms_norm -> + residual       ... x L layers
    rms_norm -> logits against the embedding (soft-capped where the config says so)

As in decode.py, the chain runs several rows of tokens at once, each weight read once for all of
them: one new token of each of several sequences (step_many), or the tokens of a short prompt
(prefill), each row the bits it gets alone.

A local layer keeps its keys in a ring of W slots (gemma3.SlidingKVCache). Once position p is
written, the filled slots hold exactly the positions a query at p may read (p-W+1 .. p), in ring
order; softmax attention does not depend on the order of its keys, so kernels.attention reads the
filled slots as they lie, all of them visible. Several tokens of one sequence go through at once
only while no ring wraps (`together`): then slot s holds position s, and causal attention over the
slots is the window's.

It computes what Gemma3.forward computes for one token, in the same cache, and is tested against
it (tests/test_gemma3_gguf.py); when they disagree, gemma3.py is right. Gemma 2 (its attention
soft-cap has no kernel), float64 runs and weights no kernel reads go through the forward.

Shape legend: B token rows, D d_model, N query heads, K kv heads, H head_dim, F FFN width, V vocab.
"""

import numba
import numpy as np

from .config import GLOBAL, LOCAL
from .decode import (PREFILL_MAX_TOKENS, StoredKernels, ThreadCount, check_step_caches,
                     prompt_groups)
from .errors import GenerationError
from .gemma3 import (EMBEDDING, Gemma3, check_tokens, refuse_non_finite, rope_for_layer,
                     soft_cap)
from .model import all_finite, embed, rope_frequencies


def together(cache, n):
    """Whether n new tokens can go through the kernels at once: none of them wraps a ring of the
    cache, so every slot still holds the position of its number, and causal attention over the
    slots is the sliding window's (n tokens at positions >= W would overwrite keys that the
    earlier of them still see)."""
    return cache.length + n <= min(len(k) for k in cache.k)


class Decoder3:
    """Runs new tokens of a Gemma 3 `model` on one build of the kernels.

    reproducible=False uses the FAST builds (fastmath: sums split over SIMD lanes); True the
    EXACT ones, whose sums run in source order whatever the CPU. Either gives the same bits for
    any number of threads; the count follows what measures faster (decode.ThreadCount). Same
    methods as decode.Decoder.
    """

    def __init__(self, model, reproducible=False):
        self.model = model
        self.kernels = StoredKernels(reproducible)
        self.threads = ThreadCount(numba.get_num_threads())
        self.on_kernels = (isinstance(model, Gemma3) and model.dtype == np.float32
                           and model.config.qk_norm and model.config.attn_softcap is None
                           and all(self.kernels.reads(w) for w in model.weights.values()))
        if self.on_kernels:
            c = model.config
            # inv_freq [H/2] and linear RoPE scaling factor of local and global layers
            self.rope = {t: (rope_frequencies(c.head_dim, base, np.float32), factor)
                         for t in (LOCAL, GLOBAL) for base, factor in [rope_for_layer(c, t)]}
            # kernels.attention scales scores by H^-0.5, Gemma 3 by query_pre_attn_scalar^-0.5:
            # the query is scaled by their ratio (1 in the 270M, whose scalar is H).
            self.query_scale = np.float32((c.head_dim / c.query_pre_attn_scalar) ** 0.5)
            self.output = model.weights[EMBEDDING][:c.n_real_tokens]  # padding rows never scored

    def warm_up(self):
        """Compile (or load from numba's cache) every kernel for this model's argument types, by
        running one step and a two-token prompt (the kernels of several token rows) into
        throwaway caches: the surest way to meet them all."""
        if self.on_kernels:
            self.step(0, self.model.new_cache(1))
            self.prefill([0, 0], self.model.new_cache(2))

    def step(self, token, cache):
        """Logits [V] float32 of the token after `token`, which goes in at position cache.length."""
        return self.step_many([token], [cache])[0]

    def step_many(self, tokens, caches):
        """One step of several sequences, each in its own cache, each weight read once for all of
        them. -> logits [B, V]"""
        check_step_caches(tokens, caches)
        if not self.on_kernels:
            return np.stack([self.model.forward([t], c)[0] for t, c in zip(tokens, caches)])
        ids = check_tokens(tokens, self.model.config.n_real_tokens)
        caches = [self.model.check_cache(cache, 1) for cache in caches]
        starts = [cache.length for cache in caches]
        logits = self.threads.run(lambda: self.rows(ids, caches, [1] * len(ids)), kind=len(ids))
        return self.refuse_non_finite(logits, [[t] for t in ids], caches, starts)

    def prefill(self, token_ids, cache):
        """Logits [V] of the last of token_ids, which continue `cache` (Gemma3.forward's
        last_only). A short prompt goes through the kernels, all its tokens at once while no ring
        of the cache wraps (see `together`), else one at a time (a forward widens every matrix,
        seconds for quantized ones); a long one through the forward."""
        tokens = check_tokens(token_ids, self.model.config.n_real_tokens)
        if not self.on_kernels or len(tokens) > PREFILL_MAX_TOKENS:
            return self.model.forward(tokens, cache, last_only=True)[0]
        self.model.check_cache(cache, len(tokens))
        start = cache.length
        chunks = [tokens] if together(cache, len(tokens)) else [[t] for t in tokens]
        for j, chunk in enumerate(chunks):  # the logits of the last token only
            last = j == len(chunks) - 1
            logits = self.threads.run(lambda: self.rows(chunk, [cache], [len(chunk)], last),
                                      kind=(len(chunk), last))  # a step without logits costs less
        return self.refuse_non_finite(logits, [tokens], [cache], [start])[0]

    def prefill_many(self, prompts, caches):
        """prefill for several sequences, prompts[j] continuing caches[j]. -> logits [J, V]

        Prompts that can go through at once (`together`) run together, up to PREFILL_MAX_TOKENS
        tokens per pass; each row is the bits prefill(prompts[j], caches[j]) gives alone."""
        if len(prompts) != len(caches) or len({id(c) for c in caches}) != len(caches):
            raise GenerationError("prefill_many: needs one cache of its own per prompt")
        tokens = [check_tokens(p, self.model.config.n_real_tokens) for p in prompts]
        if self.on_kernels:
            caches = [self.model.check_cache(c, len(t)) for c, t in zip(caches, tokens)]
        fits = [self.on_kernels and together(c, len(t)) for c, t in zip(caches, tokens)]
        groups, alone = prompt_groups([len(t) for t in tokens], fits)
        logits = [None] * len(tokens)
        for j in alone:
            logits[j] = self.prefill(tokens[j], caches[j])
        for group in groups:
            batch, starts = [caches[j] for j in group], [caches[j].length for j in group]
            rows = self.threads.run(
                lambda: self.rows(np.concatenate([tokens[j] for j in group]), batch,
                                  [len(tokens[j]) for j in group]), kind=None)
            rows = self.refuse_non_finite(rows, [tokens[j] for j in group], batch, starts)
            for j, row in zip(group, rows):
                logits[j] = row
        return np.stack(logits)

    def refuse_non_finite(self, logits, prompts, caches, starts):
        """logits [J, V], unless a row holds a NaN or an infinity (never handed out silently):
        then every cache is spent and the error of gemma3.refuse_non_finite names the first layer
        that went wrong for the first such row."""
        if all_finite(logits):
            return logits
        j = next(j for j, row in enumerate(logits) if not all_finite(row))
        error = refuse_non_finite(self.model, prompts[j], caches[j], starts[j], last_only=True)
        for cache in caches:
            cache.spent = caches[j].spent
        raise error

    # ------------------------------------------------------------------------------------------

    def rows(self, tokens, caches, counts, logits=True):
        """Gemma3.forward on the kernels for several sequences at once: sequence j's counts[j]
        tokens, consecutive in `tokens`, continue caches[j] (more than one only where
        `together` allows). -> logits [J, V] of each sequence's last token (None without
        `logits`: only the caches are filled)"""
        c, w = self.model.config, self.model.weights
        starts = [cache.length for cache in caches]
        positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)])  # [B]
        h = embed(tokens, w[EMBEDDING], self.model.normalizer, np.float32)        # [B, D]
        for i in range(c.n_layers):
            h = self.block(i, h, positions, caches, starts, counts)
        for cache, start, n in zip(caches, starts, counts):
            cache.length = start + n
        if not logits:
            return None
        last = np.cumsum(counts) - 1                                               # [J]
        h = self.kernels.rms_norm(h[last], w["model.norm.weight"], c.norm_eps)
        return soft_cap(self.kernels.matmul(self.output, h), c.final_softcap)     # [J, V]

    def block(self, i, h, positions, caches, starts, counts):
        """Gemma3.block for token rows h [B, D] of several sequences at `positions` [B]: each
        sequence's keys and values join its own cache, and its queries attend to that cache."""
        c, k, eps = self.model.config, self.kernels, self.model.config.norm_eps
        w = lambda name: self.model.weights[f"model.layers.{i}.{name}.weight"]
        B, N, K, H = len(h), c.n_heads, c.n_kv_heads, c.head_dim

        x = k.rms_norm(h, w("input_layernorm"), eps)
        q, key, v = k.qkv(w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj"), x)
        q = k.rms_norm(q.reshape(B * N, H), w("self_attn.q_norm"), eps)  # QK-norm: each head [H]
        key = k.rms_norm(key.reshape(B * K, H), w("self_attn.k_norm"), eps)
        inv_freq, factor = self.rope[c.layer_types[i]]
        scaled = positions / factor  # linear scaling: position / factor, as the forward
        q = k.rope(q.reshape(B, N, H), scaled, inv_freq) * self.query_scale       # [B, N, H]
        key, v = k.rope(key.reshape(B, K, H), scaled, inv_freq), v.reshape(B, K, H)
        o = np.empty((B, N * H), np.float32)
        row = 0
        for cache, start, n in zip(caches, starts, counts):
            size = len(cache.k[i])           # a ring of W slots (local) or max_len (global)
            at = start % size                # n > 1 only without a wrap: slots at .. at + n - 1
            cache.k[i][at:at + n], cache.v[i][at:at + n] = key[row:row + n], v[row:row + n]
            filled = min(start + n, size)
            # Query t sees keys 0 .. filled - n + t: one token sees every filled slot (the ring
            # holds its window); several (no wrap, slot = position) see the positions up to theirs.
            o[row:row + n] = k.attention(q[row:row + n], cache.k[i][:filled],
                                         cache.v[i][:filled], filled - n)         # [n, N*H]
            row += n
        a = k.rms_norm(k.matmul(w("self_attn.o_proj"), o), w("post_attention_layernorm"), eps)
        h = h + a

        y = k.rms_norm(h, w("pre_feedforward_layernorm"), eps)
        f = k.matmul(w("mlp.down_proj"), k.gate_up(w("mlp.gate_proj"), w("mlp.up_proj"), y))
        return h + k.rms_norm(f, w("post_feedforward_layernorm"), eps)
