"""Regenerate the conformance pack: tiny Gemma-architecture checkpoints and their goldens.

    python tests/conformance/regenerate.py [OUT]     (default: this directory)

Deterministic: the weights come from a seeded NumPy generator, rounded to bfloat16 and written by
the `safetensors` package; the tokenizer is minigemma/tiny_tokenizer.py (single-threaded
SentencePiece training on a fixed corpus); the goldens are recorded by `minigemma golden record`
from prompts.jsonl. Re-running gives byte-identical checkpoints and tokenizers, and goldens equal
within float32 rounding (the same bytes on the same machine). Needs torch (to hand bfloat16 to
safetensors) and sentencepiece.

The checkpoints (the 2B and 7B attention layouts, shrunk):
    tiny-mqa   multi-query like 2B: 4 query heads share 1 kv head; N*H = 64 != D = 48
    tiny-mha   multi-head like 7B: 4 query and 4 kv heads; N*H = 48 != D = 40; 3 layers
Neither sqrt(48) nor sqrt(40) is a bfloat16 number, so a bfloat16-rounded normalizer shows.
"""

import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, os.pardir, os.pardir)
sys.path[:0] = [REPO, os.path.join(REPO, "scripts")]

from minigemma import golden  # noqa: E402
from minigemma.checkpoint import expected_shapes  # noqa: E402
from minigemma.config import GemmaConfig  # noqa: E402
from minigemma.random_checkpoint import hf_config, random_bf16, weight_std  # noqa: E402
from minigemma.tiny_tokenizer import train_tiny_tokenizer  # noqa: E402

VOCAB = 512  # the tiny tokenizer's pieces
CHECKPOINTS = {
    "tiny-mqa": (GemmaConfig(vocab_size=VOCAB, d_model=48, n_layers=2, n_heads=4, n_kv_heads=1,
                             head_dim=16, ffn_dim=96, max_positions=512), 1001),
    "tiny-mha": (GemmaConfig(vocab_size=VOCAB, d_model=40, n_layers=3, n_heads=4, n_kv_heads=4,
                             head_dim=12, ffn_dim=80, max_positions=512), 1002),
}
# What the goldens record: full logits up to 64 tokens, so prompts.jsonl's 300-token "long"
# prompt exercises the top-k form; 16 greedy tokens; activations for the "chat" prompt.
RECORD = dict(activations=["chat"], new_tokens=16, full_logits_max_tokens=64, top_k=16,
              atol=1e-4, rtol=1e-4, activation_tol=1e-5)


def random_weights(config, seed):
    """{name: bfloat16 tensor}, every tensor seeded random: embedding ~ N(0, 0.1), projections
    ~ N(0, 1/fan_in), norm weights ~ N(0, 0.5) so that a missing +1 in (1 + w) shows."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        bits = random_bf16(rng, shape, weight_std(name, shape, embed_std=0.1))
        tensors[name] = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    return tensors


def write_checkpoint(directory, config, seed, tokenizer):
    os.makedirs(directory, exist_ok=True)
    save_file(random_weights(config, seed), os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(config), f, indent=2)
        f.write("\n")
    shutil.copyfile(tokenizer, os.path.join(directory, "tokenizer.model"))


def main(out=HERE):
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tiny_tokenizer(os.path.join(tmp, "tokenizer.model"))
        for name, (config, seed) in CHECKPOINTS.items():
            weights = os.path.join(out, "checkpoints", name)
            write_checkpoint(weights, config, seed, tokenizer)
            golden.record(weights, os.path.join(HERE, "prompts.jsonl"),
                          os.path.join(out, "goldens", name), overwrite=True,
                          progress=lambda line: print(f"{name} {line}"), **RECORD)
    print(f"wrote {out}/checkpoints and {out}/goldens")


if __name__ == "__main__":
    main(*sys.argv[1:2])
