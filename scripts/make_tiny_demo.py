"""Write examples/tiny-gemma: a seeded random Gemma-architecture checkpoint, NumPy only (~130 KB)."""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from minigemma import safetensors  # noqa: E402
from minigemma.checkpoint import expected_shapes  # noqa: E402
from minigemma.config import GemmaConfig  # noqa: E402
from minigemma.model import round_to_bf16  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "tiny-gemma")
CONFIG = GemmaConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16,
                     ffn_dim=128, max_positions=1024)


def hf_config(c):
    return {"architectures": ["GemmaForCausalLM"], "model_type": "gemma",
            "vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.head_dim, "intermediate_size": c.ffn_dim,
            "max_position_embeddings": c.max_positions, "rope_theta": c.rope_base,
            "rms_norm_eps": c.norm_eps, "hidden_activation": "gelu_pytorch_tanh",
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16",
            "tie_word_embeddings": True}


def random_bf16(rng, shape, std):
    rounded = round_to_bf16(rng.standard_normal(shape, dtype=np.float32) * np.float32(std))
    return (rounded.view(np.uint32) >> 16).astype(np.uint16)  # the top 16 bits are the bfloat16


def main():
    rng = np.random.default_rng(1234)
    tensors = {}
    for name, shape in expected_shapes(CONFIG).items():
        std = 0.1 if "embed" in name else (shape[1] ** -0.5 if len(shape) == 2 else 0.5)
        tensors[name] = random_bf16(rng, shape, std)
    os.makedirs(OUT, exist_ok=True)
    safetensors.write(os.path.join(OUT, "model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(hf_config(CONFIG), f, indent=2)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
