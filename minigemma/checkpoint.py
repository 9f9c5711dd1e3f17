"""minigemma.load: a checkpoint in any format minigemma reads (formats/) -> a model, its weights
checked against its config. Gemma 1 becomes a Gemma (model.py); Gemma 2 and 3 a Gemma3 (gemma3.py).
The tensors stay memory-mapped in their stored dtype where the format allows.
"""

import os

import numpy as np

from .config import Gemma3Config
from .errors import CheckpointError, GenerationError, NonFiniteWeightsError
from .formats import read_checkpoint
from .gemma3 import Gemma3, check_weights_v2, text_weights
from .model import Gemma, first_non_finite, upcast

EMBEDDING = "model.embed_tokens.weight"


def expected_shapes(config):
    """{tensor name: shape} of a Hugging Face Gemma 1 checkpoint (torch Linear layout [out, in])."""
    D, N, K, H, F = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim
    shapes = {EMBEDDING: (config.vocab_size, D), "model.norm.weight": (D,)}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (N * H, D),
            p + "self_attn.k_proj.weight": (K * H, D),
            p + "self_attn.v_proj.weight": (K * H, D),
            p + "self_attn.o_proj.weight": (D, N * H),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        })
    return shapes


def check_weights(tensors, config, source):
    """Raise a CheckpointError naming the first tensor that is missing, unexpected or misshapen."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor {name} is missing (expected shape {shape})")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape "
                                  f"{tuple(tensors[name].shape)}, expected {shape} for the config "
                                  f"in {source}/config.json")
    unexpected = sorted(set(tensors) - set(expected) - {"lm_head.weight"})
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]} (not part of Gemma 1)")


def check_tied_head(tensors, source):
    """Gemma ties the output projection to the embedding; a stored lm_head must equal it."""
    head, table = tensors["lm_head.weight"], tensors[EMBEDDING]
    if head.shape != table.shape:
        raise CheckpointError(f"{source}: lm_head.weight has shape {head.shape}, expected the "
                              f"embedding's {table.shape} (Gemma ties them)")
    rows = max(1, (1 << 24) // max(1, table.shape[1]))
    for start in range(0, table.shape[0], rows):
        if not np.array_equal(upcast(head[start:start + rows]), upcast(table[start:start + rows])):
            raise CheckpointError(f"{source}: lm_head.weight differs from {EMBEDDING} (row "
                                  f"{start} on); Gemma 1 ties them, so this is not a Gemma 1 "
                                  f"checkpoint")


def check_finite(weights, source):
    """Raise a NonFiniteWeightsError naming the first tensor that holds a NaN or an infinity, and
    the index of its first one. Reads every weight once, ~16 MB at a time (quantized weights are
    dequantized block by block, as the model reads them)."""
    for name, w in weights.items():
        found = first_non_finite(w)
        if found is not None:
            index, value = found
            raise NonFiniteWeightsError(f"{source}: tensor {name} holds {value} at index {index} "
                                        f"(its first non-finite value); the checkpoint is damaged")


def load(path, *, config=None, dtype=np.float32, normalizer="exact", check_weights=False):
    """Load a Gemma checkpoint (weights memory-mapped): a Hugging Face directory, a gemma_pytorch
    .ckpt, a .gguf file or an Orbax directory (see formats.read_checkpoint). Gemma 1 gives a Gemma,
    Gemma 2 and 3 a Gemma3; `model.source` says which format was read and where the config came
    from.

    config: None (from the checkpoint; a .ckpt's shapes are matched against the 2B/7B presets),
    a path to a Hugging Face config.json, or a GemmaConfig.

    dtype: compute dtype, float32 (default) or float64 for a higher-precision reference run.
    normalizer: "exact" (float32 sqrt(D), as transformers) or "bf16" (45.25 / 55.5, as the
    official JAX code with bfloat16 parameters); see model.embedding_normalizer.
    check_weights: read every weight once and raise a NonFiniteWeightsError at the first NaN or
    infinity (seconds for 2B; off by default, since loading otherwise reads only headers).
    """
    path = os.fspath(path)
    if normalizer not in ("exact", "bf16"):
        raise GenerationError(f"normalizer must be 'exact' or 'bf16', got {normalizer!r}")
    config, tensors, description = read_checkpoint(path, config=config, normalizer=normalizer)
    model = build(config, tensors, path, dtype)
    model.source = description  # which format was read, and where the config came from
    if check_weights:
        check_finite(model.weights, path)
    return model


def build(config, tensors, source, dtype=np.float32):
    """The model `config` describes, over `tensors` checked against it: a Gemma for Gemma 1, a
    Gemma3 for Gemma 2 and 3."""
    if isinstance(config, Gemma3Config):
        tensors = text_weights(tensors)
        check_weights_v2(tensors, config, source)
        return Gemma3(config, tensors, dtype=dtype)
    check_weights(tensors, config, source)
    if "lm_head.weight" in tensors:
        check_tied_head(tensors, source)
    return Gemma(config, tensors, dtype=dtype)
