"""The decode engine: one new token through Gemma 1 on the numba kernels of kernels.py.

Generating text is one prefill of the prompt (Gemma.forward: NumPy and BLAS) followed by one
`decode_step` per new token. A step is a chain of matrix-vector products whose cost is reading
every weight from memory once, so each stage of Gemma.block runs as a kernel that reads the
weights as stored:

    rms_norm -> qkv (one pass, three matrices) -> rope -> attention over the cache -> matvec o_proj
    rms_norm -> gate_up (one pass, GELU inside) -> matvec down_proj           ... x L layers
    rms_norm -> matvec against the embedding (the logits)

It computes what Gemma.forward computes for one token, in the same KV cache, and is tested
against it (tests/test_decode.py); when they disagree, model.py is right. Weights the kernels do
not read (float16, quantized), float64 runs and Gemma 2/3 models decode through their forward.

Shape legend: D d_model, N query heads, K kv heads, H head_dim, F FFN width, V vocab, S positions.
"""

import numpy as np

from . import kernels
from .model import Gemma, embed, rope_frequencies

KERNEL_DTYPES = (np.dtype(np.uint16), np.dtype(np.float32))  # bfloat16 bits, float32


class Decoder:
    """Decodes one token at a time for `model` with one build of the kernels.

    reproducible=False uses the FAST build (fastmath: sums split over SIMD lanes); True the EXACT
    build, whose sums run in source order whatever the CPU (about ten times slower). Either build
    gives the same bits for any number of threads.
    """

    def __init__(self, model, reproducible=False):
        self.model = model
        self.kernels = kernels.EXACT if reproducible else kernels.FAST
        self.on_kernels = isinstance(model, Gemma) and model.dtype == np.float32 and all(
            isinstance(w, np.ndarray) and w.dtype in KERNEL_DTYPES for w in model.weights.values())
        if self.on_kernels:
            c = model.config
            self.inv_freq = rope_frequencies(c.head_dim, c.rope_base, np.float32)  # [H/2]

    def warm_up(self):
        """Compile (or load from numba's cache) the kernels for this model's weight dtype."""
        if self.on_kernels:
            self.kernels.warm_up(self.model.weights["model.embed_tokens.weight"].dtype)

    def step(self, token, cache):
        """Logits [V] float32 of the token after `token`, which goes in at position cache.length."""
        if not self.on_kernels:
            return self.model.forward([token], cache)[0]
        tokens = self.model.check_tokens([token])
        cache = self.model.check_cache(cache, 1)
        return decode_step(self.model, self.kernels, self.inv_freq, tokens, cache)


def decode_step(model, k, inv_freq, tokens, cache):
    """Gemma.forward for one token, stage by stage on the kernels `k`. -> logits [V]"""
    c, w, eps = model.config, model.weights, model.config.norm_eps
    table = w["model.embed_tokens.weight"]
    pos = cache.length
    h = embed(tokens, table, model.normalizer, np.float32)[0]                  # [D]
    for i in range(c.n_layers):
        lw = lambda name: w[f"model.layers.{i}.{name}.weight"]
        x = k.rms_norm(h, lw("input_layernorm"), eps)
        q, key, v = k.qkv(lw("self_attn.q_proj"), lw("self_attn.k_proj"), lw("self_attn.v_proj"), x)
        cache.k[i, pos] = k.rope(key.reshape(c.n_kv_heads, c.head_dim), pos, inv_freq)  # [K, H]
        cache.v[i, pos] = v.reshape(c.n_kv_heads, c.head_dim)
        q = k.rope(q.reshape(c.n_heads, c.head_dim), pos, inv_freq)                     # [N, H]
        o = k.attention(q, cache.k[i, :pos + 1], cache.v[i, :pos + 1])                  # [N*H]
        h = h + k.matvec(lw("self_attn.o_proj"), o)
        y = k.rms_norm(h, lw("post_attention_layernorm"), eps)
        h = h + k.matvec(lw("mlp.down_proj"), k.gate_up(lw("mlp.gate_proj"), lw("mlp.up_proj"), y))
    cache.length = pos + 1
    h = k.rms_norm(h, w["model.norm.weight"], eps)
    return k.matvec(table[:c.n_real_tokens], h)                                # [V]
