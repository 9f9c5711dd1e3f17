"""Gemma hyperparameters: GemmaConfig for Gemma 1, Gemma3Config for Gemma 2 and 3.

Shape legend used throughout minigemma (comments, docstrings, lessons):
    T tokens, D d_model, N query heads, K kv heads, H head_dim, F FFN branch width, V vocab.
"""

from dataclasses import dataclass

from .errors import ConfigError

# More layers than any config.json of a real model will ask for (Gemma 3 27B has 62): a larger
# number is a damaged file, and lists built per layer would fill the memory.
MAX_LAYERS = 10_000

# Gemma 1's tokenizer has 256000 pieces. The Flax/Kaggle checkpoints (and the report) carry
# 256128 embedding rows: the extra 128 rows are padding that is never a real token.
TOKENIZER_VOCAB = 256000


@dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int = 256000       # V: rows of the embedding table (256000, or 256128 with padding)
    d_model: int = 2048            # D
    n_layers: int = 18
    n_heads: int = 8               # N query heads
    n_kv_heads: int = 1            # K: 1 = multi-query (2B), = n_heads for multi-head (7B)
    head_dim: int = 256            # H: 256 for both sizes; NOT d_model / n_heads (7B: 16*256 != 3072)
    ffn_dim: int = 16384           # F: width of each GeGLU branch (the report's "32768" is 2F)
    max_positions: int = 8192
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    normalizer: str = "exact"      # sqrt(D) as float32 ("exact") or rounded to bfloat16 ("bf16")

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_dim", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_layers > MAX_LAYERS:
            raise ConfigError(f"config: n_layers is {self.n_layers}, more than any Gemma "
                              f"({MAX_LAYERS} at most); the config is damaged")
        for name in ("rope_base", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"config: {name} must be a positive number, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"config: n_heads ({self.n_heads}) must be a multiple of "
                              f"n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.normalizer not in ("exact", "bf16"):
            raise ConfigError(f"config: normalizer must be 'exact' or 'bf16', got {self.normalizer!r}")

    @property
    def n_real_tokens(self):
        """Rows of the embedding that are real tokens; rows past this are padding, never sampled."""
        return TOKENIZER_VOCAB if self.vocab_size == 256128 else self.vocab_size


def gemma_2b(**overrides):
    """Gemma 2B (1.0, 1.1, CodeGemma 2B): multi-query attention, 8 query heads share 1 kv head."""
    return GemmaConfig(**{**dict(vocab_size=256000, d_model=2048, n_layers=18, n_heads=8,
                                 n_kv_heads=1, head_dim=256, ffn_dim=16384), **overrides})


def gemma_7b(**overrides):
    """Gemma 7B: multi-head attention, 16 query heads and 16 kv heads of size 256 (N*H = 4096 != D)."""
    return GemmaConfig(**{**dict(vocab_size=256000, d_model=3072, n_layers=28, n_heads=16,
                                 n_kv_heads=16, head_dim=256, ffn_dim=24576), **overrides})


# Gemma 1 was trained with the tanh approximation of GELU. Hugging Face configs of the 1.0 models
# say "gelu" in hidden_act, which transformers 4.38.0-4.38.2 took as the exact erf GELU (a famous
# bug); transformers now maps it to the tanh version, and so do we. Anything else is not Gemma 1.
_GEMMA1_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")


def from_hf_config(hf, source="config.json", normalizer="exact"):
    """GemmaConfig from a Hugging Face config.json dict (GemmaForCausalLM)."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: expected a JSON object of Gemma hyperparameters, "
                          f"got {type(hf).__name__}")

    def need(key):
        if key not in hf:
            raise ConfigError(f"{source}: missing key {key!r}")
        return hf[key]

    model_type = hf.get("model_type", "gemma")
    if model_type != "gemma":
        raise ConfigError(f"{source}: model_type is {model_type!r}; minigemma implements Gemma 1 "
                          f"(model_type 'gemma')")
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in _GEMMA1_ACTIVATIONS:
        raise ConfigError(f"{source}: activation {activation!r} is not Gemma 1's tanh-approximate "
                          f"GELU (expected one of {', '.join(_GEMMA1_ACTIVATIONS)})")
    rope = _json_object(hf, "rope_parameters", source)
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{source}: rope scaling {hf.get('rope_scaling') or rope!r} is not used "
                          f"by Gemma 1 (expected plain RoPE)")
    n_heads = need("num_attention_heads")
    hyperparameters = dict(
        vocab_size=need("vocab_size"),
        d_model=need("hidden_size"),
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads", n_heads),
        # A missing head_dim means 256, as in transformers' GemmaConfig: never D / N (192 for 7B).
        head_dim=hf.get("head_dim") or 256,
        ffn_dim=need("intermediate_size"),
        max_positions=hf.get("max_position_embeddings", 8192),
        rope_base=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
    )
    try:
        return GemmaConfig(**hyperparameters, normalizer=normalizer)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _json_object(hf, key, source):
    """hf[key] when it is a JSON object; {} when it is absent or null."""
    value = hf.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key} must be a JSON object, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# Gemma 2 and Gemma 3 (text): the model is in gemma3.py. What they change, with the official
# values (google-deepmind/gemma, gemma/gm/nn/_gemma.py; the Gemma 2 and Gemma 3 reports):
#   Gemma 2: local sliding-window layers (window 4096) alternate with global ones, starting local;
#            attention logits soft-capped at 50 and final logits at 30; RoPE base 10k everywhere.
#   Gemma 3: five local layers (window 512 for 270M/1B, 1024 for 4B+) per global one; QK-norm
#            instead of soft-caps; RoPE base 10k on local layers, 1M on global ones, the global
#            positions divided by 8 (linear scaling) in 4B, 12B and 27B.

LOCAL, GLOBAL = "sliding_attention", "full_attention"  # transformers' names in config.json

# Embedding rows that are padding: the Flax Gemma 2 files carry 256128 rows for a 256000-piece
# tokenizer; transformers' Gemma 3 4B+ checkpoints carry 262208 rows for 262144 pieces (the
# official model has num_embed 262144). Padding rows are never scored.
_PADDED_VOCAB = {256128: 256000, 262208: 262144}


@dataclass(frozen=True)
class Gemma3Config:
    """Gemma 2 and Gemma 3 (text) hyperparameters. Gemma 2 is the same model without QK-norm
    and with soft-caps (attn_softcap 50, final_softcap 30)."""
    vocab_size: int                # V: 256000 (Gemma 2), 262144 (Gemma 3 270M, 1B), 262208 (4B+)
    d_model: int                   # D
    n_layers: int
    n_heads: int                   # N query heads
    n_kv_heads: int                # K kv heads
    head_dim: int                  # H
    ffn_dim: int                   # F: width of each GeGLU branch
    max_positions: int
    layer_types: tuple             # per layer: LOCAL (sliding window) or GLOBAL (all positions)
    sliding_window: int            # W: a local query at p sees keys p-W+1 .. p
    query_pre_attn_scalar: float   # scores are scaled by query_pre_attn_scalar^-0.5
    qk_norm: bool                  # Gemma 3: RMSNorm over H on queries and keys, before RoPE
    attn_softcap: float | None     # Gemma 2: 50.0; cap * tanh(score / cap)
    final_softcap: float | None    # Gemma 2: 30.0; cap * tanh(logit / cap)
    local_rope_base: float = 10000.0
    global_rope_base: float = 10000.0     # Gemma 3: 1,000,000
    local_rope_factor: float = 1.0        # linear RoPE scaling: positions divided by the factor
    global_rope_factor: float = 1.0       # Gemma 3 4B, 12B, 27B: 8.0
    norm_eps: float = 1e-6
    normalizer: str = "exact"      # sqrt(D) as float32 ("exact") or rounded to bfloat16 ("bf16")

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))  # hashable, immutable
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_dim", "max_positions", "sliding_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        for name in ("query_pre_attn_scalar", "local_rope_base", "global_rope_base", "norm_eps",
                     "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is None and name.endswith("softcap"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"config: {name} must be a positive number, got {value!r}")
        for name in ("local_rope_factor", "global_rope_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
                raise ConfigError(f"config: {name} (linear RoPE scaling) must be a number >= 1, "
                                  f"got {value!r}")
        if not isinstance(self.qk_norm, bool):
            raise ConfigError(f"config: qk_norm must be true or false, got {self.qk_norm!r}")
        if len(self.layer_types) != self.n_layers:
            raise ConfigError(f"config: layer_types has {len(self.layer_types)} entries for "
                              f"{self.n_layers} layers")
        bad = [t for t in self.layer_types if t not in (LOCAL, GLOBAL)]
        if bad:
            raise ConfigError(f"config: layer type {bad[0]!r} is neither {LOCAL!r} nor {GLOBAL!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"config: n_heads ({self.n_heads}) must be a multiple of "
                              f"n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.normalizer not in ("exact", "bf16"):
            raise ConfigError(f"config: normalizer must be 'exact' or 'bf16', got {self.normalizer!r}")

    @property
    def name(self):
        return "Gemma 3" if self.qk_norm else "Gemma 2"

    @property
    def n_real_tokens(self):
        """Rows of the embedding that are real tokens; rows past this are padding, never scored."""
        return _PADDED_VOCAB.get(self.vocab_size, self.vocab_size)


def local_global_pattern(n_layers, period):
    """Layer types repeating (period - 1) local layers then one global layer, as transformers
    builds them when config.json has no layer_types: Gemma 2 period 2, Gemma 3 period 6."""
    if not isinstance(n_layers, int) or not 1 <= n_layers <= MAX_LAYERS:
        raise ConfigError(f"config: {n_layers!r} layers; a Gemma has 1..{MAX_LAYERS}")
    return tuple(LOCAL if (i + 1) % period else GLOBAL for i in range(n_layers))


# transformers 5.24's defaults (Gemma2Config, Gemma3TextConfig) for keys a config.json may omit:
# the Gemma 3 4B config.json, for one, lists only a few keys under text_config.
_V2_DEFAULTS = {
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, max_position_embeddings=8192, query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0, pattern=2, global_theta=10000.0,
                   local_theta=10000.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, max_position_embeddings=131072, query_pre_attn_scalar=256,
                        sliding_window=4096, final_logit_softcapping=None,
                        attn_logit_softcapping=None, pattern=6, global_theta=1_000_000.0,
                        local_theta=10000.0),
}


def from_hf_config_v2(hf, source="config.json", normalizer="exact"):
    """Gemma3Config from a Hugging Face config.json dict: model_type "gemma2"
    (Gemma2ForCausalLM), "gemma3_text" (Gemma3ForCausalLM) or "gemma3" (its text_config).

    Reads both the transformers 5.x keys (rope_parameters, keyed by layer type for Gemma 3) and
    the older ones on the hub (rope_theta, rope_local_base_freq, rope_scaling,
    sliding_window_pattern), and fills missing keys with transformers' defaults.
    """
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: expected a JSON object of Gemma hyperparameters, "
                          f"got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type == "gemma3":  # the multimodal config: the language model is its text_config
        hf, source = _json_object(hf, "text_config", source), f"{source} (text_config)"
        model_type = hf.get("model_type", "gemma3_text")
    if not isinstance(model_type, str) or model_type not in _V2_DEFAULTS:
        raise ConfigError(f"{source}: model_type is {model_type!r}; expected 'gemma2', "
                          f"'gemma3_text' or 'gemma3' (Gemma 1, 'gemma', is read by "
                          f"from_hf_config)")
    default = _V2_DEFAULTS[model_type]
    get = lambda key: hf.get(key, default[key])

    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in _GEMMA1_ACTIVATIONS:
        raise ConfigError(f"{source}: activation {activation!r} is not Gemma's tanh-approximate "
                          f"GELU (expected one of {', '.join(_GEMMA1_ACTIVATIONS)})")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if hf.get(key):
            raise ConfigError(f"{source}: {key} is true; Gemma 2 and 3 text models have no "
                              f"attention bias and attend causally")
    if model_type == "gemma3_text" and hf.get("attn_logit_softcapping") is not None:
        # transformers' Gemma3Attention never passes a soft-cap to attention: it would be ignored.
        raise ConfigError(f"{source}: attn_logit_softcapping is set, but Gemma 3 has no attention "
                          f"soft-cap (transformers ignores it)")

    n_layers = get("num_hidden_layers")
    pattern = hf.get("sliding_window_pattern", default["pattern"])
    for key, value in (("num_hidden_layers", n_layers), ("sliding_window_pattern", pattern)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LAYERS:
            raise ConfigError(f"{source}: {key} must be an integer in 1..{MAX_LAYERS}, got "
                              f"{value!r}")
    layer_types = hf.get("layer_types") or local_global_pattern(n_layers, pattern)
    if not isinstance(layer_types, (list, tuple)):
        raise ConfigError(f"{source}: layer_types must be a list, got {layer_types!r}")
    (local_base, local_factor), (global_base, global_factor) = _rope_per_layer_type(
        hf, model_type, source)
    n_heads = get("num_attention_heads")
    hyperparameters = dict(
        vocab_size=get("vocab_size"),
        d_model=get("hidden_size"),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads", default["num_key_value_heads"]),
        head_dim=hf.get("head_dim") or default["head_dim"],
        ffn_dim=get("intermediate_size"),
        max_positions=get("max_position_embeddings"),
        layer_types=layer_types,
        sliding_window=get("sliding_window"),
        query_pre_attn_scalar=get("query_pre_attn_scalar"),
        qk_norm=model_type == "gemma3_text",
        attn_softcap=get("attn_logit_softcapping"),
        final_softcap=get("final_logit_softcapping"),
        local_rope_base=local_base,
        global_rope_base=global_base,
        local_rope_factor=local_factor,
        global_rope_factor=global_factor,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
    )
    try:
        return Gemma3Config(**hyperparameters, normalizer=normalizer)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _rope_per_layer_type(hf, model_type, source):
    """((base, linear factor) of local layers, (base, factor) of global layers).

    transformers 5.x writes rope_parameters: one dict for Gemma 2, a dict per layer type for
    Gemma 3 ({"sliding_attention": {...}, "full_attention": {...}}). Older Gemma 3 configs say
    rope_theta (global), rope_local_base_freq (local) and rope_scaling (global layers only), as
    transformers' Gemma3TextConfig.convert_rope_params_to_dict reads them.
    """
    default = _V2_DEFAULTS[model_type]
    rope = _json_object(hf, "rope_parameters", source)
    scaling = _json_object(hf, "rope_scaling", source)
    if model_type == "gemma2":
        params = {**rope, **scaling}
        params.setdefault("rope_theta", hf.get("rope_theta", default["global_theta"]))
        both = _base_and_factor(params, source, "rope_parameters")
        return both, both
    if rope and not set(rope) & {LOCAL, GLOBAL}:
        raise ConfigError(f"{source}: Gemma 3's rope_parameters must be keyed by layer type "
                          f"({LOCAL!r}, {GLOBAL!r}), got keys {sorted(rope)}")
    full = {**_json_object(rope, GLOBAL, source), **scaling}
    full.setdefault("rope_theta", hf.get("rope_theta", default["global_theta"]))
    local = dict(_json_object(rope, LOCAL, source))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", default["local_theta"]))
    return (_base_and_factor(local, source, f"rope_parameters[{LOCAL!r}]"),
            _base_and_factor(full, source, f"rope_parameters[{GLOBAL!r}]"))


def _base_and_factor(params, source, where):
    kind = params.get("rope_type", "default")
    if kind == "default" and "factor" in params:  # e.g. the older alias {"type": "linear", ...}
        raise ConfigError(f"{source}: {where}: {params!r} has a scaling factor but RoPE type "
                          f"'default'; transformers ignores the factor (say rope_type 'linear')")
    if kind == "default":
        return params["rope_theta"], 1.0
    if kind == "linear" and "factor" in params:
        return params["rope_theta"], params["factor"]
    raise ConfigError(f"{source}: {where}: RoPE type {kind!r} with {params!r} is not used by "
                      f"Gemma 2 or 3 (expected 'default', or 'linear' with a factor)")


def config_from_hf(hf, source="config.json", normalizer="exact"):
    """The config of a Hugging Face config.json dict, by its model_type: GemmaConfig for Gemma 1
    ("gemma", the default), Gemma3Config for "gemma2", "gemma3_text" and "gemma3"."""
    if isinstance(hf, dict) and hf.get("model_type") in ("gemma2", "gemma3_text", "gemma3"):
        return from_hf_config_v2(hf, source=source, normalizer=normalizer)
    return from_hf_config(hf, source=source, normalizer=normalizer)
