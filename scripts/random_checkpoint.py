"""Pieces shared by the scripts that write seeded random Gemma checkpoints with NumPy alone."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from minigemma.model import round_to_bf16  # noqa: E402


def hf_config(c):
    """The config.json of a Hugging Face GemmaForCausalLM with the shape of GemmaConfig c."""
    return {"architectures": ["GemmaForCausalLM"], "model_type": "gemma",
            "vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.head_dim, "intermediate_size": c.ffn_dim,
            "max_position_embeddings": c.max_positions, "rope_theta": c.rope_base,
            "rms_norm_eps": c.norm_eps, "hidden_activation": "gelu_pytorch_tanh",
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16",
            "tie_word_embeddings": True}


def weight_std(name, shape, embed_std):
    """Scale of the random values of one tensor, chosen so activations stay O(1).

    Linear weights [out, in]: in^-0.5. Norm weights: 0.5, so that (1 + w) and w differ.
    The embedding: `embed_std`, which sets the size of the logits (they are dot products with it).
    """
    if "embed" in name:
        return embed_std
    return shape[1] ** -0.5 if len(shape) == 2 else 0.5


def random_bf16(rng, shape, std):
    """N(0, std) values rounded to bfloat16, as uint16 bits [shape].

    Drawn ~4M values at a time, so that a large tensor never has float32 temporaries of its full
    size; the values are the same as one draw of the whole shape.
    """
    out = np.empty(shape, np.uint16)
    rows = out.reshape(shape[0], -1)  # [rows, rest]; a view into out
    per_block = max(1, (1 << 22) // rows.shape[1])
    for start in range(0, len(rows), per_block):
        block = rows[start:start + per_block]
        values = rng.standard_normal(block.shape, dtype=np.float32) * np.float32(std)
        block[:] = round_to_bf16(values).view(np.uint32) >> 16  # the top 16 bits are the bfloat16
    return out
