"""Write examples/tiny-gemma: a seeded random Gemma-architecture checkpoint, NumPy only (~450 KB)."""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from minigemma.formats import safetensors  # noqa: E402
from minigemma.checkpoint import expected_shapes  # noqa: E402
from minigemma.config import GemmaConfig  # noqa: E402
from minigemma.random_checkpoint import hf_config, random_bf16, weight_std  # noqa: E402
from minigemma.tiny_tokenizer import train_tiny_tokenizer  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "tiny-gemma")
# head_dim (32) != d_model / heads (24), and sqrt(96) = 9.798 is not a bfloat16 number (9.8125 is):
# so the classic bugs the lessons teach (a (D/N)^-0.5 query scale, a bf16 normalizer) change the text.
CONFIG = GemmaConfig(vocab_size=512, d_model=96, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=32,
                     ffn_dim=192, max_positions=1024)


def main():
    rng = np.random.default_rng(1234)
    tensors = {}
    for name, shape in expected_shapes(CONFIG).items():
        tensors[name] = random_bf16(rng, shape, weight_std(name, shape, embed_std=0.1))
    os.makedirs(OUT, exist_ok=True)
    safetensors.write(os.path.join(OUT, "model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(hf_config(CONFIG), f, indent=2)
    train_tiny_tokenizer(os.path.join(OUT, "tokenizer.model"), vocab_size=CONFIG.vocab_size)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
