"""Gemma 2 and Gemma 3 (text), in NumPy: only what they change from Gemma 1 (model.py).

    tokens -> embedding x sqrt(D) -> L x [ RMSNorm -> attention -> RMSNorm -> + residual
                                           RMSNorm -> GeGLU     -> RMSNorm -> + residual ]
           -> final RMSNorm -> logits against the embedding table (Gemma 2: soft-capped at 30)

What changes (Gemma 2 report, arXiv:2408.00118; Gemma 3 report, arXiv:2503.19786; checked against
google-deepmind/gemma gemma/gm/nn/_modules.py and transformers 5.24 modeling_gemma2.py and
modeling_gemma3.py):
  - local layers attend to the last W positions only (sliding window), global layers to all;
    config.layer_types says which is which (Gemma 2: every other layer; Gemma 3: 5 local : 1 global)
  - each sub-block's output is RMS-normalised before it joins the residual: four norms per block
  - scores are scaled by query_pre_attn_scalar^-0.5 (not always H^-0.5)
  - Gemma 2 soft-caps attention scores (50) and final logits (30): cap * tanh(x / cap)
  - Gemma 3 RMS-normalises queries and keys over H (QK-norm) before RoPE, has no soft-caps, and
    uses RoPE base 10k on local layers and 1M on global ones (4B+: global positions divided by 8)

Everything else (embedding, RMSNorm, RoPE, GeGLU, weight widening) is model.py's functions.
Shape legend: T tokens, S keys attended, D d_model, N query heads, K kv heads, H head_dim,
F FFN branch width, V vocab, W sliding window. Weights keep the Hugging Face names and layout.
"""

import numpy as np

from .config import LOCAL
from .errors import CheckpointError, ContextFullError, GenerationError, check_memory
from .model import (all_finite, embed, embedding_normalizer, geglu, linear, non_finite_error,
                    rms_norm, rope, softmax, upcast)

EMBEDDING = "model.embed_tokens.weight"

# ----------------------------------------------------------------------------------------------
# 1. Soft-capping (Gemma 2)


def soft_cap(x, cap):
    """cap * tanh(x / cap): x squashed smoothly into (-cap, cap). No cap (None): x unchanged."""
    if cap is None:
        return x
    cap = x.dtype.type(cap)
    return cap * np.tanh(x / cap)


# ----------------------------------------------------------------------------------------------
# 2. QK-norm and per-layer RoPE (Gemma 3)


def qk_norm(x, w, eps):
    """RMSNorm of every head's query or key over H, times (1 + w): [T, heads, H] -> same.

    Applied before RoPE (transformers' Gemma3Attention; _query_norm / _key_norm in the official
    code); w has H entries, shared by all heads.
    """
    return rms_norm(x, w, eps)


def rope_for_layer(config, layer_type):
    """(RoPE base, linear scaling factor) of a local or a global layer.

    Gemma 3: base 10,000 on local layers and 1,000,000 on global ones; 4B+ divide global positions
    by 8. Gemma 2: base 10,000 everywhere.
    """
    if layer_type == LOCAL:
        return config.local_rope_base, config.local_rope_factor
    return config.global_rope_base, config.global_rope_factor


def rope_scaled(x, positions, base, factor):
    """model.rope at positions / factor: linear RoPE scaling as the official apply_rope does it.
    transformers divides inv_freq by the factor instead: the same angles up to rounding, and
    exactly the same for a power-of-two factor such as Gemma 3's 8."""
    return rope(x, positions / factor, base)


# ----------------------------------------------------------------------------------------------
# 3. Attention with a sliding window and a soft-cap


def visible(query_positions, key_positions, window):
    """[T, S] mask of the keys each query may read: not in its future, and for a local layer
    (window W) not older than W - 1 positions, so it sees W keys, itself included (transformers'
    sliding_window_overlay: kv > q - W; the official create_sliding_mask)."""
    q, k = query_positions[:, None], key_positions[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def attention(q, k, v, query_positions, key_positions, *, scale, softcap, window):
    """Softmax attention of T queries over S keys/values, each key at its own position.

    q [T, N, H] and k, v [S, K, H] (post-RoPE; the keys in any order) -> [T, N*H]
    Query head n reads kv head n // (N/K). Scores: (q . k) * scale, soft-capped, then masked.
    """
    T, N, H = q.shape
    S, K, _ = k.shape
    q = q.reshape(T, K, N // K, H)                                         # [T, K, G, H]
    scores = np.einsum("tkgh,skh->kgts", q, k) * q.dtype.type(scale)        # [K, G, T, S]
    # The soft-cap comes before the mask (masked scores must stay -inf, not -cap).
    scores = soft_cap(scores, softcap)
    scores = np.where(visible(query_positions, key_positions, window), scores, -np.inf)
    probs = softmax(scores)
    return np.einsum("kgts,skh->tkgh", probs, v).reshape(T, N * H)


# ----------------------------------------------------------------------------------------------
# 4. The KV cache: global layers keep every position, local layers only the last W


class SlidingKVCache:
    """Post-RoPE keys and values per layer for the positions seen so far.

    Global layer: k[i], v[i] [max_len, K, H], position p in slot p. Local layer: a ring of
    min(W, max_len) slots, position p in slot p % W, so it never grows past the window; the
    position in every slot is recovered from `length` alone (ring_positions). Setting `length`
    back to 0 empties the cache; rewinding to any other position is impossible (ring slots past
    it were overwritten). So a forward refused for non-finite logits leaves the cache `spent`
    (the reason, a sentence), and the model refuses it from then on.
    """

    def __init__(self, layer_types, max_len, window, n_kv_heads, head_dim, dtype):
        sizes = cache_sizes(layer_types, window, max_len)
        self.k = [np.zeros((n, n_kv_heads, head_dim), dtype) for n in sizes]
        self.v = [np.zeros_like(k) for k in self.k]
        self.max_len = max_len
        self.length = 0  # positions filled
        self.spent = None

    def attend_keys(self, i, k, v, positions):
        """Keys and values layer i's new queries read: the cached ones, then the new k, v
        [T, K, H], with their positions [S]. Then stores the new ones.

        Prefill longer than a local layer's ring stays exact: the new keys are attended before
        the ring keeps only the last of them.
        """
        start, size = positions[0], len(self.k[i])
        held = ring_positions(start, size)                      # positions in slots 0, 1, ...
        keys = np.concatenate([self.k[i][:len(held)], k])
        values = np.concatenate([self.v[i][:len(held)], v])
        key_positions = np.concatenate([held, positions])
        keep = slice(max(0, len(positions) - size), None)    # the last `size` new positions
        self.k[i][positions[keep] % size] = k[keep]
        self.v[i][positions[keep] % size] = v[keep]
        return keys, values, key_positions


def cache_sizes(layer_types, window, max_len):
    """Slots per layer: the window (at most max_len) for a local layer, max_len for a global one."""
    return [min(window, max_len) if t == LOCAL else max_len for t in layer_types]


def ring_positions(length, size):
    """The position held by each filled slot of a ring of `size` slots after positions
    0..length-1 were written to slot p % size: the latest p < length congruent to the slot.
    [min(length, size)]; for a global layer (size >= length) simply 0..length-1."""
    slots = np.arange(min(length, size))
    return slots + size * ((length - 1 - slots) // size)


# ----------------------------------------------------------------------------------------------
# 5. The model


POINTS_PER_LAYER = ("attn_norm", "q_norm", "k_norm", "q_rope", "k_rope", "attn_out",
                    "post_attn_norm", "resid_attn", "ffn_norm", "ffn_out", "post_ffn_norm",
                    "resid_block")


def activation_points(config):
    """The named activation points of Gemma3.forward(record=...), in the order data flows
    (q_norm and k_norm only with QK-norm, i.e. Gemma 3)."""
    per_layer = [p for p in POINTS_PER_LAYER if config.qk_norm or p not in ("q_norm", "k_norm")]
    layers = [f"layers.{i}.{p}" for i in range(config.n_layers) for p in per_layer]
    return ["embed", *layers, "final_norm", "logits"]


class Gemma3:
    """A Gemma 2 or Gemma 3 (text) model over a dict of weights named as in the Hugging Face
    checkpoint (Gemma2ForCausalLM, Gemma3ForCausalLM). Build one with `load_hf_dir(path)`.

    `forward` runs whole prompts (prefill) and single tokens (decode) through the same code; a
    SlidingKVCache carries the context between calls.
    """

    def __init__(self, config, weights, dtype=np.float32):
        self.config = config
        self.weights = weights
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise GenerationError(f"dtype must be float32 or float64, got {self.dtype}")
        # sqrt(D) as transformers' Gemma3TextScaledWordEmbedding computes it for float32 weights;
        # the official Embedder rounds it to the parameters' dtype (normalizer="bf16").
        self.normalizer = embedding_normalizer(config.d_model, config.normalizer, self.dtype)

    def new_cache(self, max_len=None):
        """An empty KV cache for up to `max_len` positions (default: the model's max positions);
        local layers hold at most the window."""
        c = self.config
        max_len = c.max_positions if max_len is None else max_len
        if not 0 < max_len <= c.max_positions:
            raise GenerationError(f"max_len must be in 1..{c.max_positions} (the model's max "
                                  f"positions), got {max_len}")
        slots = sum(cache_sizes(c.layer_types, c.sliding_window, max_len))
        check_memory(2 * slots * c.n_kv_heads * c.head_dim * self.dtype.itemsize,
                     f"a KV cache of {max_len} positions ({self.dtype})")
        return SlidingKVCache(c.layer_types, max_len, c.sliding_window, c.n_kv_heads, c.head_dim,
                              self.dtype)

    def forward(self, token_ids, cache=None, *, last_only=False, record=None):
        """Logits [T, V] (or [1, V] with last_only) for token_ids [T], in the compute dtype.

        With `cache=None` the tokens start at position 0; otherwise they continue after the
        `cache.length` positions already in the cache, and the cache is extended. V counts real
        tokens only (padding rows of the embedding are never scored).
        `record`, a dict, receives the named intermediate activations (activation_points).
        """
        tokens = check_tokens(token_ids, self.config.n_real_tokens)
        cache = self.check_cache(cache, len(tokens))
        c, w, dtype = self.config, self.weights, self.dtype
        start = cache.length
        positions = np.arange(start, start + len(tokens))
        keep = record.__setitem__ if record is not None else lambda name, value: None

        h = embed(tokens, w[EMBEDDING], self.normalizer, dtype)                # [T, D]
        keep("embed", h)
        for i in range(c.n_layers):
            h = self.block(i, h, positions, cache, keep)
        cache.length = start + len(tokens)

        if last_only:
            h = h[-1:]
        h = rms_norm(h, w["model.norm.weight"], c.norm_eps)
        keep("final_norm", h)
        # Tied output: logits against the (unscaled) embedding table, then Gemma 2's soft-cap.
        logits = soft_cap(linear(h, w[EMBEDDING][:c.n_real_tokens], dtype), c.final_softcap)
        keep("logits", logits)                                                 # [T, V]
        if not all_finite(logits):  # never hand out NaN or infinity silently (a rare path)
            raise refuse_non_finite(self, tokens, cache, start, last_only)
        return logits

    def block(self, i, h, positions, cache, keep):
        """One decoder layer: normed attention and normed GeGLU, each normed again and added."""
        c, dtype = self.config, self.dtype
        w = lambda name: self.weights[f"model.layers.{i}.{name}"]
        T = len(positions)

        x = rms_norm(h, w("input_layernorm.weight"), c.norm_eps)              # [T, D]
        keep(f"layers.{i}.attn_norm", x)
        q = linear(x, w("self_attn.q_proj.weight"), dtype).reshape(T, c.n_heads, c.head_dim)
        k = linear(x, w("self_attn.k_proj.weight"), dtype).reshape(T, c.n_kv_heads, c.head_dim)
        v = linear(x, w("self_attn.v_proj.weight"), dtype).reshape(T, c.n_kv_heads, c.head_dim)
        if c.qk_norm:
            q = qk_norm(q, w("self_attn.q_norm.weight"), c.norm_eps)
            k = qk_norm(k, w("self_attn.k_norm.weight"), c.norm_eps)
            keep(f"layers.{i}.q_norm", q)
            keep(f"layers.{i}.k_norm", k)
        base, factor = rope_for_layer(c, c.layer_types[i])
        q, k = rope_scaled(q, positions, base, factor), rope_scaled(k, positions, base, factor)
        keep(f"layers.{i}.q_rope", q)
        keep(f"layers.{i}.k_rope", k)
        k_all, v_all, key_positions = cache.attend_keys(i, k, v, positions)   # [S, K, H]
        window = c.sliding_window if c.layer_types[i] == LOCAL else None
        o = attention(q, k_all, v_all, positions, key_positions,
                      scale=c.query_pre_attn_scalar ** -0.5, softcap=c.attn_softcap,
                      window=window)                                           # [T, N*H]
        keep(f"layers.{i}.attn_out", o)
        # Here "post_attention_layernorm" really follows attention (in Gemma 1 it is the pre-FFN
        # norm); the pre-FFN norm is "pre_feedforward_layernorm".
        a = rms_norm(linear(o, w("self_attn.o_proj.weight"), dtype),
                     w("post_attention_layernorm.weight"), c.norm_eps)
        keep(f"layers.{i}.post_attn_norm", a)
        h = h + a
        keep(f"layers.{i}.resid_attn", h)

        y = rms_norm(h, w("pre_feedforward_layernorm.weight"), c.norm_eps)
        keep(f"layers.{i}.ffn_norm", y)
        f = geglu(y, *(w(f"mlp.{name}_proj.weight") for name in ("gate", "up", "down")))
        keep(f"layers.{i}.ffn_out", f)
        f = rms_norm(f, w("post_feedforward_layernorm.weight"), c.norm_eps)
        keep(f"layers.{i}.post_ffn_norm", f)
        h = h + f
        keep(f"layers.{i}.resid_block", h)
        return h

    def check_cache(self, cache, n_new):
        """The cache n_new tokens continue (a new one for cache=None), or a GenerationError saying
        why it cannot hold them."""
        c = self.config
        if cache is None:
            if n_new > c.max_positions:
                raise ContextFullError(f"token_ids: {n_new} tokens exceed the model's max "
                                       f"positions ({c.max_positions})")
            return self.new_cache(n_new)
        if not isinstance(cache, SlidingKVCache):
            raise GenerationError(f"cache must come from model.new_cache(), got "
                                  f"{type(cache).__name__}")
        found = [(*k.shape, k.dtype) for k in cache.k]
        expected = [(n, c.n_kv_heads, c.head_dim, self.dtype)
                    for n in cache_sizes(c.layer_types, c.sliding_window, cache.max_len)]
        if found != expected:
            raise GenerationError("cache was made for a different model (layer types, window, kv "
                                  "heads, head_dim or dtype differ); use model.new_cache()")
        if cache.spent:
            raise GenerationError(f"cache: {cache.spent}; start a new one with model.new_cache()")
        if cache.length + n_new > cache.max_len:
            raise ContextFullError(f"token_ids: {n_new} new tokens after {cache.length} cached "
                                   f"positions exceed the cache's max_len ({cache.max_len})")
        return cache


def refuse_non_finite(model, tokens, cache, start, last_only):
    """The NonFiniteError for a forward of tokens [T] from position `start` whose logits were
    not all finite (model.py's non_finite_error names the first layer that went wrong, running
    the forward again: its local layers may read ring slots the first run overwrote, which cannot
    hide a NaN weight). The cache is spent: its ring slots past `start` were overwritten."""
    cache.length = start
    error = non_finite_error(model, tokens, cache, last_only)
    cache.spent = f"a forward from position {start} gave non-finite logits"
    return error


def check_tokens(token_ids, n_tokens):
    """token_ids as a 1-D int64 array of ids below n_tokens, or a GenerationError saying what's
    wrong."""
    try:
        tokens = np.asarray(token_ids)
    except ValueError:  # a ragged nested list
        raise GenerationError("token_ids must be a 1-D array of integers, got a ragged "
                              "list") from None
    if tokens.ndim != 1 or not (np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0):
        raise GenerationError(f"token_ids must be a 1-D array of integers, got "
                              f"shape {tokens.shape} dtype {tokens.dtype}")
    if tokens.size == 0:
        raise GenerationError("token_ids is empty; a prompt needs at least one token (<bos> = 2)")
    bad = tokens[(tokens < 0) | (tokens >= n_tokens)]
    if len(bad):
        raise GenerationError(f"token_ids: id {int(bad[0])} is out of range; the vocabulary has "
                              f"ids 0..{n_tokens - 1}")
    return tokens.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# 6. Weights: a Hugging Face Gemma2ForCausalLM / Gemma3ForCausalLM checkpoint directory


def expected_shapes_v2(config):
    """{tensor name: shape} of a Hugging Face Gemma 2 / Gemma 3 text checkpoint ([out, in])."""
    c = config
    D, N, K, H, F = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim
    shapes = {EMBEDDING: (c.vocab_size, D), "model.norm.weight": (D,)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (N * H, D),
            p + "self_attn.k_proj.weight": (K * H, D),
            p + "self_attn.v_proj.weight": (K * H, D),
            p + "self_attn.o_proj.weight": (D, N * H),
            p + "post_attention_layernorm.weight": (D,),
            p + "pre_feedforward_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
            p + "post_feedforward_layernorm.weight": (D,),
        })
        if c.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (H,),
                           p + "self_attn.k_norm.weight": (H,)})
    return shapes


def text_weights(tensors):
    """The language model's tensors under Gemma3ForCausalLM's names. A
    Gemma3ForConditionalGeneration checkpoint (model_type "gemma3", on the hub and as
    transformers 5.24 saves it) names them "language_model.model.*"; its vision tower and
    projector are dropped."""
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("language_model.model."):
            name = name[len("language_model."):]
        if not name.startswith(("vision_tower.", "multi_modal_projector.")):
            out[name] = tensor
    return out


def check_weights_v2(tensors, config, source):
    """Raise a CheckpointError naming the first tensor that is missing, unexpected or misshapen,
    or a stored lm_head.weight that is not the embedding (Gemma ties them)."""
    expected = expected_shapes_v2(config)
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor {name} is missing (expected shape {shape})")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape "
                                  f"{tuple(tensors[name].shape)}, expected {shape} for the config "
                                  f"in {source}/config.json")
    unexpected = sorted(set(tensors) - set(expected) - {"lm_head.weight"})
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]} (not part of "
                              f"{config.name})")
    if "lm_head.weight" in tensors and not tied(tensors["lm_head.weight"], tensors[EMBEDDING]):
        raise CheckpointError(f"{source}: lm_head.weight differs from {EMBEDDING}; {config.name} "
                              f"ties them, so this is not a {config.name} checkpoint")


def tied(head, table):
    """Whether a stored output head equals the embedding table, compared ~64 MB at a time."""
    if head.shape != table.shape:
        return False
    rows = max(1, (1 << 24) // table.shape[1])
    return all(np.array_equal(upcast(head[r:r + rows]), upcast(table[r:r + rows]))
               for r in range(0, table.shape[0], rows))
