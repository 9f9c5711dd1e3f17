"""The decode engine of Gemma 3 (gemma3.py): one new token on numba kernels.

As decode.py does for Gemma 1, a step runs each stage of Gemma3.block as a kernel that reads the
weights as stored: kernels.py's for float32 and bfloat16 weights, quant_kernels.py's for
quantized ones (GGUF blocks, gemma_pytorch int8), so the built-in 270M's Q4_K, Q5_0, Q6_K and
Q8_0 matrices are never widened whole:

    rms_norm -> q, k, v -> QK-norm -> rope (the layer's base) -> attention over the layer's cache
             -> o_proj -> rms_norm -> + residual
    rms_norm -> gate, up, GELU -> down_proj -> rms_norm -> + residual       ... x L layers
    rms_norm -> logits against the embedding (soft-capped where the config says so)

A local layer keeps its keys in a ring of W slots (gemma3.SlidingKVCache). Once position p is
written, the filled slots hold exactly the positions a query at p may read (p-W+1 .. p), in ring
order; softmax attention does not depend on the order of its keys, so kernels.attention reads the
filled slots as they lie, all of them visible.

It computes what Gemma3.forward computes for one token, in the same cache, and is tested against
it (tests/test_gemma3_gguf.py); when they disagree, gemma3.py is right. Gemma 2 (its attention
soft-cap has no kernel), float64 runs and weights no kernel reads go through the forward.

Shape legend: D d_model, N query heads, K kv heads, H head_dim, F FFN width, V vocab.
"""

import numba
import numpy as np

from .config import GLOBAL, LOCAL
from .decode import PREFILL_MAX_TOKENS, StoredKernels, ThreadCount, check_step_caches
from .errors import GenerationError
from .gemma3 import (EMBEDDING, Gemma3, check_tokens, refuse_non_finite, rope_for_layer,
                     soft_cap)
from .model import all_finite, embed, rope_frequencies


class Decoder3:
    """Runs new tokens of a Gemma 3 `model` on one build of the kernels.

    reproducible=False uses the FAST builds (fastmath: sums split over SIMD lanes); True the
    EXACT ones, whose sums run in source order whatever the CPU. Either gives the same bits for
    any number of threads; the count follows what measures faster (decode.ThreadCount). Same
    methods as decode.Decoder; several sequences run one after another.
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
        running one step into a throwaway cache: the surest way to meet them all."""
        if self.on_kernels:
            self.step(0, self.model.new_cache(1))

    def step(self, token, cache):
        """Logits [V] float32 of the token after `token`, which goes in at position cache.length."""
        if not self.on_kernels:
            return self.model.forward([token], cache)[0]
        tokens = check_tokens([token], self.model.config.n_real_tokens)
        cache = self.model.check_cache(cache, 1)
        start = cache.length
        logits = self.threads.run(lambda: self.decode_step(tokens, cache), kind=1)  # timed
        return self.refuse_non_finite(logits, tokens, cache, start)

    def step_many(self, tokens, caches):
        """One step of several sequences, each in its own cache. -> logits [B, V]"""
        check_step_caches(tokens, caches)
        return np.stack([self.step(t, c) for t, c in zip(tokens, caches)])

    def prefill(self, token_ids, cache):
        """Logits [V] of the last of token_ids, which continue `cache` (Gemma3.forward's
        last_only). A short prompt goes through the kernels one token at a time (a forward
        widens every matrix, seconds for quantized ones); a long one through the forward."""
        tokens = check_tokens(token_ids, self.model.config.n_real_tokens)
        if not self.on_kernels or len(tokens) > PREFILL_MAX_TOKENS:
            return self.model.forward(tokens, cache, last_only=True)[0]
        self.model.check_cache(cache, len(tokens))
        start = cache.length
        for j in range(len(tokens)):  # the logits of the last token only
            last = j == len(tokens) - 1
            logits = self.threads.run(lambda: self.decode_step(tokens[j:j + 1], cache, last),
                                      kind=int(last))  # a step without logits costs less
        return self.refuse_non_finite(logits, tokens, cache, start)

    def prefill_many(self, prompts, caches):
        """prefill for several sequences, prompts[j] continuing caches[j]. -> logits [J, V]"""
        if len(prompts) != len(caches) or len({id(c) for c in caches}) != len(caches):
            raise GenerationError("prefill_many: needs one cache of its own per prompt")
        return np.stack([self.prefill(p, c) for p, c in zip(prompts, caches)])

    def refuse_non_finite(self, logits, tokens, cache, start):
        """logits [V], unless they hold a NaN or an infinity (never handed out silently): then
        the error of gemma3.refuse_non_finite, naming the first layer that went wrong."""
        if not all_finite(logits):
            raise refuse_non_finite(self.model, tokens, cache, start, last_only=True)
        return logits

    # ------------------------------------------------------------------------------------------

    def decode_step(self, tokens, cache, logits=True):
        """Gemma3.forward for one token [1], stage by stage on the kernels. -> logits [V] (None
        without `logits`: only the cache is filled)"""
        c, w = self.model.config, self.model.weights
        h = embed(tokens, w[EMBEDDING], self.model.normalizer, np.float32)        # [1, D]
        for i in range(c.n_layers):
            h = self.block(i, h, cache)
        cache.length += 1
        if not logits:
            return None
        h = self.kernels.rms_norm(h, w["model.norm.weight"], c.norm_eps)
        return soft_cap(self.kernels.matmul(self.output, h)[0], c.final_softcap)  # [V]

    def block(self, i, h, cache):
        """Gemma3.block for one token h [1, D] at position cache.length -> [1, D]."""
        c, k, eps = self.model.config, self.kernels, self.model.config.norm_eps
        w = lambda name: self.model.weights[f"model.layers.{i}.{name}.weight"]
        N, K, H = c.n_heads, c.n_kv_heads, c.head_dim
        pos = cache.length

        x = k.rms_norm(h, w("input_layernorm"), eps)
        q, key, v = k.qkv(w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj"), x)
        q = k.rms_norm(q.reshape(N, H), w("self_attn.q_norm"), eps)     # QK-norm: each head [H]
        key = k.rms_norm(key.reshape(K, H), w("self_attn.k_norm"), eps)
        inv_freq, factor = self.rope[c.layer_types[i]]
        position = np.array([pos / factor])  # linear scaling: position / factor, as the forward
        q = k.rope(q[None], position, inv_freq) * self.query_scale                # [1, N, H]
        size = len(cache.k[i])               # a ring of W slots (local) or max_len (global)
        cache.k[i][pos % size] = k.rope(key[None], position, inv_freq)[0]          # [K, H]
        cache.v[i][pos % size] = v.reshape(K, H)
        filled = min(pos + 1, size)
        # A query at first_position p sees keys 0..p: with p = filled - 1, every filled slot.
        o = k.attention(q, cache.k[i][:filled], cache.v[i][:filled], filled - 1)   # [1, N*H]
        a = k.rms_norm(k.matmul(w("self_attn.o_proj"), o), w("post_attention_layernorm"), eps)
        h = h + a

        y = k.rms_norm(h, w("pre_feedforward_layernorm"), eps)
        f = k.matmul(w("mlp.down_proj"), k.gate_up(w("mlp.gate_proj"), w("mlp.up_proj"), y))
        return h + k.rms_norm(f, w("post_feedforward_layernorm"), eps)
