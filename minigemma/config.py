"""Gemma 1 hyperparameters.

Shape legend used throughout minigemma (comments, docstrings, lessons):
    T tokens, D d_model, N query heads, K kv heads, H head_dim, F FFN branch width, V vocab.
"""

from dataclasses import dataclass

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
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        for name in ("rope_base", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"config: {name} must be a positive number, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"config: n_heads ({self.n_heads}) must be a multiple of "
                             f"n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.normalizer not in ("exact", "bf16"):
            raise ValueError(f"config: normalizer must be 'exact' or 'bf16', got {self.normalizer!r}")

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
        raise ValueError(f"{source}: expected a JSON object of Gemma hyperparameters, "
                         f"got {type(hf).__name__}")

    def need(key):
        if key not in hf:
            raise ValueError(f"{source}: missing key {key!r}")
        return hf[key]

    model_type = hf.get("model_type", "gemma")
    if model_type != "gemma":
        raise ValueError(f"{source}: model_type is {model_type!r}; minigemma implements Gemma 1 "
                         f"(model_type 'gemma')")
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in _GEMMA1_ACTIVATIONS:
        raise ValueError(f"{source}: activation {activation!r} is not Gemma 1's tanh-approximate "
                         f"GELU (expected one of {', '.join(_GEMMA1_ACTIVATIONS)})")
    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{source}: rope scaling {hf.get('rope_scaling') or rope!r} is not used "
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
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
