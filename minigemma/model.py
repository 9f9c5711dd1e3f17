"""Gemma 1, the whole model, in the order data flows through it.

    tokens -> embedding x sqrt(D) -> L x [ RMSNorm -> attention (RoPE, multi-query) -> + residual
                                           RMSNorm -> GeGLU feed-forward            -> + residual ]
           -> final RMSNorm -> logits against the same embedding table

Shape legend: T tokens, S cached positions, D d_model, N query heads, K kv heads, H head_dim,
F FFN branch width, V vocab. Weights keep the names of the Hugging Face checkpoint and the layout
of torch's Linear: a projection x -> x W^T with W stored [out, in].

Numerics (docs/numerics.md): everything is computed in `dtype` (float32 by default,
float64 for a higher-precision reference). Weights stay in their stored dtype (bfloat16 bits as
uint16) and are widened inside the computation, which is exact. Each place where a port of Gemma
has gone wrong carries a one-line comment saying what the right choice is.
"""

import numpy as np

from .errors import ContextFullError, GenerationError, NonFiniteError, check_memory
from .quant import Quantized

# ----------------------------------------------------------------------------------------------
# Weights: bfloat16 is the top half of a float32, so widening it is a 16-bit shift, no rounding.


def upcast(w, dtype=np.float32):
    """Stored weights (uint16 bfloat16 bits, float16 or float32) -> an array of `dtype`."""
    if w.dtype == np.uint16:
        w = (w.astype(np.uint32) << 16).view(np.float32)
    return w.astype(dtype, copy=False)


def widen_rows(w, rows, dtype):
    """Rows (a slice or an index array) of a stored weight as `dtype`: 16-bit floats widened
    exactly, quantized blocks dequantized as their format defines (quant.py)."""
    if isinstance(w, Quantized):
        return w.dequantize(rows).astype(dtype, copy=False)
    return upcast(w[rows], dtype)


def linear(x, w, dtype):
    """x W^T for a torch-layout weight, in BLAS. [T, in] x [out, in] -> [T, out]

    Stored 16-bit weights are widened a block of rows at a time into one reused buffer: each
    matrix is widened once per call (once per prompt, not per token) and never becomes a full
    float32 copy. Generation decodes with numba kernels that read the stored weights (decode.py).
    """
    if not isinstance(w, Quantized) and w.dtype == dtype:
        return x @ w.T
    rows, cols = w.shape
    block = min(rows, max(1, (1 << 22) // cols))  # rows per block: ~16 MB of float32
    wide = np.empty((block, cols), dtype)
    out = np.empty((x.shape[0], rows), dtype)
    for start in range(0, rows, block):
        n = min(block, rows - start)
        if w.dtype == np.uint16 and dtype == np.float32:  # bfloat16 -> float32: shift into place
            np.left_shift(w[start:start + n], 16, out=wide[:n].view(np.uint32), dtype=np.uint32)
        else:
            wide[:n] = widen_rows(w, slice(start, start + n), dtype)
        out[:, start:start + n] = x @ wide[:n].T
    return out


def all_finite(x):
    """Whether x holds no NaN and no infinity. A float64 sum answers without a temporary array
    the size of x (one NaN or infinity makes it non-finite); only if the sum overflowed are the
    values checked one by one."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN: no need to warn
        return bool(np.isfinite(np.sum(x, dtype=np.float64)) or np.isfinite(x).all())


def first_non_finite(w):
    """(index, value) of the first NaN or infinity of a stored weight in row-major order, or None.

    Widened a block of rows at a time (~16 MB of float32), so neither a bfloat16 nor a quantized
    weight is ever copied whole.
    """
    if w.ndim == 1:
        return _first_non_finite_in(upcast(w), 0)
    block = max(1, (1 << 22) // w.shape[1])
    for start in range(0, w.shape[0], block):
        rows = widen_rows(w, slice(start, start + block), np.float32)
        found = _first_non_finite_in(rows, start)
        if found is not None:
            return found
    return None


def _first_non_finite_in(values, first_row):
    if all_finite(values):
        return None
    index = np.unravel_index(np.flatnonzero(~np.isfinite(values))[0], values.shape)
    value = values[index]
    return (first_row + int(index[0]), *map(int, index[1:])), value


# ----------------------------------------------------------------------------------------------
# 1. Embedding


def embedding_normalizer(d_model, mode, dtype):
    """The sqrt(D) that scales the embeddings.

    "exact": sqrt(D) rounded once to `dtype` (45.254833 for 2B), as transformers and gemma_pytorch
    compute it in float32. "bf16": rounded to bfloat16 (45.25 for 2B, 55.5 for 7B), as the official
    JAX code does when its parameters are bfloat16 (docs/numerics.md).
    """
    s = np.sqrt(np.float64(d_model)).astype(dtype)
    if mode == "bf16":
        s = round_to_bf16(np.float32(s)).astype(dtype)
    return s


def round_to_bf16(x):
    """float32 -> nearest bfloat16 (round half to even), returned as float32."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def embed(tokens, table, normalizer, dtype):
    """Look up token rows and scale them by sqrt(D). [T] -> [T, D]"""
    return widen_rows(table, tokens, dtype) * normalizer


# ----------------------------------------------------------------------------------------------
# 2. RMSNorm


def rms_norm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * (1 + w).  [T, D] -> [T, D]

    The stored weight is "scale minus one" (initialised to zero): multiply by (1 + w), not w.
    Computed in the activation dtype (float32 or float64), never in bfloat16.
    """
    dtype = x.dtype
    inv_rms = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + dtype.type(eps))
    return x * inv_rms * (1 + upcast(w, dtype))


# ----------------------------------------------------------------------------------------------
# 3. Rotary position embeddings


def rope_frequencies(head_dim, base, dtype):
    """inv_freq[i] = base^(-2i/H), i < H/2, computed in `dtype` as transformers does in float32."""
    exponents = np.arange(0, head_dim, 2).astype(dtype) / dtype(head_dim)
    return (1 / (dtype(base) ** exponents)).astype(dtype)


def rope(x, positions, base):
    """Rotate pairs (i, i + H/2) of every head by angle position * inv_freq[i].  [T, heads, H]

    Gemma uses the "half-split" pairing (GPT-NeoX style), not interleaved pairs (2i, 2i+1). The
    angles are formed in the activation dtype (float32), never in bfloat16.
    """
    dtype = x.dtype
    half = x.shape[-1] // 2
    angles = positions.astype(dtype)[:, None] * rope_frequencies(x.shape[-1], base, dtype.type)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]  # [T, 1, H/2]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ----------------------------------------------------------------------------------------------
# 4. Attention: N query heads share K key/value heads (2B: K = 1, multi-query; 7B: K = N)


def attention(q, k, v, first_position):
    """Causal softmax attention of T new queries over all S cached keys/values.

    q [T, N, H] (already rotated), k, v [S, K, H] with S = first_position + T -> [T, N*H]
    Query head n reads kv head n // (N/K). Scores are scaled by H^-0.5 = 1/16 (not (D/N)^-0.5).
    """
    T, N, H = q.shape
    S, K, _ = k.shape
    q = q.reshape(T, K, N // K, H)                                  # [T, K, G, H]
    scores = np.einsum("tkgh,skh->kgts", q, k) * q.dtype.type(H ** -0.5)  # [K, G, T, S]
    query_pos = first_position + np.arange(T)
    future = np.arange(S)[None, :] > query_pos[:, None]              # [T, S] causal mask
    scores = np.where(future, -np.inf, scores)
    probs = softmax(scores)
    return np.einsum("kgts,skh->tkgh", probs, v).reshape(T, N * H)


def softmax(x):
    """Softmax over the last axis, shifted by the max for range."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# 5. GeGLU feed-forward


def gelu_tanh(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Gemma was trained with this approximation; the exact erf GELU (a March-2024 bug in several
    ports) shifts every activation slightly and the logits with it.
    """
    c = x.dtype.type(np.sqrt(2 / np.pi))
    return 0.5 * x * (1 + np.tanh(c * (x + x.dtype.type(0.044715) * x * x * x)))


def geglu(y, w_gate, w_up, w_down):
    """down( gelu_tanh(gate(y)) * up(y) ).  [T, D] -> [T, F] -> [T, D]"""
    dtype = y.dtype
    return linear(gelu_tanh(linear(y, w_gate, dtype)) * linear(y, w_up, dtype), w_down, dtype)


# ----------------------------------------------------------------------------------------------
# 6. The decoder block and the full forward


# The named activation points Gemma.forward(record=...) fills, in the order data flows; goldens
# and the divergence finder use these names.
POINTS_PER_LAYER = ("attn_norm", "q_rope", "k_rope", "attn_out", "resid_attn",
                    "ffn_norm", "ffn_out", "resid_block")


def activation_points(n_layers):
    """["embed", "layers.0.attn_norm", ..., "final_norm", "logits"] for a model of n_layers."""
    layers = [f"layers.{i}.{p}" for i in range(n_layers) for p in POINTS_PER_LAYER]
    return ["embed", *layers, "final_norm", "logits"]


class KVCache:
    """Post-RoPE keys and values of every layer for the positions seen so far.

    k, v: [L, max_len, K, H]. With one kv head the 2B cache is 8x smaller than multi-head would be.
    """

    def __init__(self, n_layers, max_len, n_kv_heads, head_dim, dtype):
        self.k = np.zeros((n_layers, max_len, n_kv_heads, head_dim), dtype)
        self.v = np.zeros_like(self.k)
        self.length = 0  # positions filled

    @property
    def max_len(self):
        return self.k.shape[1]


class Gemma:
    """A Gemma 1 model over a dict of weights named as in the Hugging Face checkpoint.

    Build one with `minigemma.load(path)`. `forward` is the reference: it runs any number of
    tokens, a whole prompt or one new token, through the NumPy functions above, and a KVCache
    carries the context between calls. Generating text decodes each new token with the numba
    kernels instead (decode.py), checked against this forward.
    """

    def __init__(self, config, weights, dtype=np.float32):
        self.config = config
        self.weights = weights
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise GenerationError(f"dtype must be float32 or float64, got {self.dtype}")
        self.normalizer = embedding_normalizer(config.d_model, config.normalizer, self.dtype)

    def new_cache(self, max_len=None):
        """An empty KV cache for up to `max_len` positions (default: the model's max positions)."""
        c = self.config
        max_len = c.max_positions if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) \
                or not 0 < max_len <= c.max_positions:
            raise GenerationError(f"max_len must be in 1..{c.max_positions} (the model's max "
                                  f"positions), got {max_len!r}")
        check_memory(2 * c.n_layers * max_len * c.n_kv_heads * c.head_dim * self.dtype.itemsize,
                     f"a KV cache of {max_len} positions ({self.dtype})")
        return KVCache(c.n_layers, max_len, c.n_kv_heads, c.head_dim, self.dtype)

    def forward(self, token_ids, cache=None, *, last_only=False, record=None):
        """Logits [T, V] (or [1, V] with last_only) for token_ids [T], in the compute dtype.

        With `cache=None` the tokens start at position 0; otherwise they continue after the
        `cache.length` positions already in the cache, and the cache is extended. V counts real
        tokens only: padding rows of a 256128-row embedding are never scored.
        `record`, a dict, receives the named intermediate activations (for finding divergences).
        """
        tokens = self.check_tokens(token_ids)
        cache = self.check_cache(cache, len(tokens))
        c, w, dtype = self.config, self.weights, self.dtype
        start = cache.length
        check_memory(self.forward_bytes(len(tokens), start + len(tokens), last_only),
                     f"a forward of {len(tokens)} tokens in {dtype}")
        positions = np.arange(start, start + len(tokens))
        keep = record.__setitem__ if record is not None else lambda name, value: None

        h = embed(tokens, w["model.embed_tokens.weight"], self.normalizer, dtype)  # [T, D]
        keep("embed", h)
        for i in range(c.n_layers):
            h = self.block(i, h, positions, cache, keep)
        cache.length = start + len(tokens)

        if last_only:
            h = h[-1:]
        h = rms_norm(h, w["model.norm.weight"], c.norm_eps)
        keep("final_norm", h)
        # Tied output: logits against the (unscaled) embedding table, real tokens only.
        logits = linear(h, w["model.embed_tokens.weight"][:c.n_real_tokens], dtype)  # [T, V]
        keep("logits", logits)
        if not all_finite(logits):  # never hand out NaN or infinity silently (a rare path)
            cache.length = start    # the call is refused and leaves the cache as it was
            raise non_finite_error(self, tokens, cache, last_only)
        return logits

    def block(self, i, h, positions, cache, keep):
        """One decoder layer: pre-norm attention and pre-norm GeGLU, each added to the residual."""
        c, dtype, eps = self.config, self.dtype, self.config.norm_eps
        w = lambda name: self.weights[f"model.layers.{i}.{name}.weight"]
        T, start = len(positions), positions[0]

        x = rms_norm(h, w("input_layernorm"), eps)                                # [T, D]
        keep(f"layers.{i}.attn_norm", x)
        q = linear(x, w("self_attn.q_proj"), dtype).reshape(T, c.n_heads, c.head_dim)
        k = linear(x, w("self_attn.k_proj"), dtype).reshape(T, c.n_kv_heads, c.head_dim)
        v = linear(x, w("self_attn.v_proj"), dtype).reshape(T, c.n_kv_heads, c.head_dim)
        q, k = rope(q, positions, c.rope_base), rope(k, positions, c.rope_base)  # v is not rotated
        keep(f"layers.{i}.q_rope", q)
        keep(f"layers.{i}.k_rope", k)
        cache.k[i, start:start + T], cache.v[i, start:start + T] = k, v
        o = attention(q, cache.k[i, :start + T], cache.v[i, :start + T], start)  # [T, N*H]
        keep(f"layers.{i}.attn_out", o)
        h = h + linear(o, w("self_attn.o_proj"), dtype)
        keep(f"layers.{i}.resid_attn", h)

        # HF calls the pre-FFN norm "post_attention_layernorm"; it normalises the FFN's input.
        y = rms_norm(h, w("post_attention_layernorm"), eps)
        keep(f"layers.{i}.ffn_norm", y)
        f = geglu(y, w("mlp.gate_proj"), w("mlp.up_proj"), w("mlp.down_proj"))
        keep(f"layers.{i}.ffn_out", f)
        h = h + f
        keep(f"layers.{i}.resid_block", h)
        return h

    def check_tokens(self, token_ids):
        """token_ids as a 1-D int64 array of ids the vocabulary has, or a clear GenerationError."""
        try:
            tokens = np.asarray(token_ids)
        except ValueError:  # a ragged nested list
            raise GenerationError("token_ids must be a 1-D array of integers, got a ragged "
                                  "list") from None
        if tokens.ndim != 1 or not (np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0):
            raise GenerationError(f"token_ids must be a 1-D array of integers, got "
                                  f"shape {tokens.shape} dtype {tokens.dtype}")
        if tokens.size == 0:
            raise GenerationError("token_ids is empty; a prompt needs at least one token "
                                  "(<bos> = 2)")
        n = self.config.n_real_tokens
        bad = tokens[(tokens < 0) | (tokens >= n)]
        if len(bad):
            raise GenerationError(f"token_ids: id {int(bad[0])} is out of range; the vocabulary "
                                  f"has ids 0..{n - 1}")
        return tokens.astype(np.int64)

    def check_cache(self, cache, n_new):
        """`cache` (a new one for n_new tokens if None), checked to fit this model and n_new more."""
        c = self.config
        if cache is None:
            if n_new > c.max_positions:
                raise ContextFullError(f"token_ids: {n_new} tokens exceed the model's max "
                                       f"positions ({c.max_positions})")
            return self.new_cache(n_new)
        expected = (c.n_layers, c.n_kv_heads, c.head_dim, str(self.dtype))
        found = None
        if isinstance(cache, KVCache):
            found = (cache.k.shape[0], *cache.k.shape[2:], str(cache.k.dtype))
        if found != expected:
            raise GenerationError(f"cache was made for a different model: (layers, kv heads, "
                                  f"head_dim, dtype) {found}, expected {expected}; use "
                                  f"model.new_cache()")
        if cache.length + n_new > cache.max_len:
            raise ContextFullError(f"token_ids: {n_new} new tokens after {cache.length} cached "
                                   f"positions exceed the cache's max_len ({cache.max_len})")
        if cache.length + n_new > c.max_positions:
            raise ContextFullError(f"token_ids: {n_new} new tokens after {cache.length} cached "
                                   f"positions exceed the model's max positions "
                                   f"({c.max_positions})")
        return cache

    def forward_bytes(self, n_tokens, n_positions, last_only):
        """A lower bound on the memory a forward of n_tokens over n_positions cached positions
        allocates at its peak: the logits, two [N, T, S] attention score arrays and two [T, F]
        feed-forward arrays, in the compute dtype."""
        c = self.config
        rows = 1 if last_only else n_tokens
        elements = (rows * c.n_real_tokens + 2 * c.n_heads * n_tokens * n_positions
                    + 2 * n_tokens * c.ffn_dim)
        return elements * self.dtype.itemsize


def non_finite_error(model, tokens, cache, last_only=False):
    """A NonFiniteError for tokens [T] continuing `cache` whose logits came out not all finite
    (from model.forward or a decode engine): it names the first activation point (in data-flow
    order) holding a NaN or an infinity, and the first weight holding one nearby, if any. Runs
    model.forward (Gemma or Gemma3) again watching every point; cache.length is left as it was."""
    start, watch = cache.length, FirstNonFinite()
    try:
        model.forward(tokens, cache, last_only=last_only, record=watch)
    except FoundNonFinite as found:
        point, index, value = found.args
    else:  # the same computation gave finite values this time
        return NonFiniteError(f"a forward of {len(tokens)} tokens after {start} cached "
                              f"positions gave non-finite logits once and finite ones when "
                              f"run again")
    finally:
        cache.length = start
    where = f"layer {point.split('.')[1]} ({point})" if point.startswith("layers.") else point
    return NonFiniteError(f"a forward of {len(tokens)} tokens after {start} cached positions "
                          f"gave non-finite logits: the first non-finite value, {value}, "
                          f"appears at {where}, index {index}; {suspect_weights(model, point)}")


def suspect_weights(model, point):
    """What the weights used up to `point` say: the first one holding a NaN or an infinity
    (those of its layer; or the embedding and the final norm), or that they are finite."""
    if point.startswith("layers."):
        prefix = f"model.layers.{point.split('.')[1]}."
        names = [n for n in model.weights if n.startswith(prefix)]
    else:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
    for name in names:
        found = first_non_finite(model.weights[name])
        if found is not None:
            return f"weight {name} holds {found[1]} at index {found[0]}"
    return (f"the weights used there are finite: the values grew out of {model.dtype}'s range, "
            f"or the cache already held a non-finite value")


class FoundNonFinite(Exception):
    """Raised by FirstNonFinite: (activation point, index, value)."""


class FirstNonFinite(dict):
    """A `record` for Gemma.forward that stores nothing (memory stays bounded however long the
    prompt) and stops the forward at the first activation holding a NaN or an infinity."""

    def __setitem__(self, point, value):
        found = _first_non_finite_in(value, 0)
        if found is not None:
            raise FoundNonFinite(point, *found)
