"""Seeded random Gemma checkpoints, written with NumPy alone: the tiny test and demo checkpoints,
and the true 2B (or 7B) shape in the exact file layout of the google/gemma-2b (-7b) repository.

    python -m minigemma.random_checkpoint [OUT_DIR] [--shape 2b|7b] [--seed N]

OUT_DIR receives what downloading the Hugging Face repo gives: config.json as the repo has it, the
bfloat16 weights in shards model-0000k-of-0000n.safetensors and the index
model.safetensors.index.json (weight_map, metadata.total_size = 5,012,344,832 bytes for 2B). The
tensor names and shapes are those of checkpoint.expected_shapes; there is no lm_head (it is tied).
The weights are random, so the model says nothing sensible: the files exist to test loading and
numerics at the true size, and to time it (`minigemma bench`). The tokenizer.model is the tiny
tokenizer (tiny_tokenizer.py) padded to the vocabulary, so that `minigemma generate --weights
OUT_DIR` runs. Never commit them (5 GB for 2B, 17 GB for 7B).

Default OUT_DIR: default_dir(shape), gemma-SHAPE-shape in minigemma's cache directory (cache.py).
A directory that already holds a complete checkpoint of the same shape and seed is kept as is.
Tensors are drawn and written one at a time (at most ~2 GB of memory, for the 2B embedding).
"""

import argparse
import json
import os
import time

import numpy as np

from .cache import cache_dir
from .checkpoint import expected_shapes
from .config import gemma_2b, gemma_7b
from .formats import safetensors
from .model import round_to_bf16
from .tiny_tokenizer import pad_tokenizer, train_tiny_tokenizer

PRESETS = {"2b": gemma_2b, "7b": gemma_7b}
# save_pretrained's max_shard_size="5GB" when the Gemma repos were made: 2 shards for 2B, 4 for 7B.
MAX_SHARD_BYTES = 5_000_000_000
INDEX = "model.safetensors.index.json"
MARKER = "minigemma-random.json"  # written last: seed, shape and file sizes of a complete checkpoint


# ----------------------------------------------------------------------------------------------
# Random tensors and config.json, for checkpoints of any size


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


# ----------------------------------------------------------------------------------------------
# The true 2B / 7B shape, in the google/gemma-2b (-7b) repository layout


def default_dir(shape="2b"):
    """Where the benchmark and the slow tests keep the generated checkpoint of `shape`."""
    return os.path.join(cache_dir(), f"gemma-{shape}-shape")


def repo_config(c):
    """config.json as in the google/gemma-2b and -7b repos: keys sorted (as save_pretrained writes
    them), the 1.0 release's "hidden_act": "gelu", which means the tanh GELU (minigemma.config), and
    no tie_word_embeddings: save_pretrained left out values equal to the defaults (True)."""
    config = hf_config(c)
    del config["hidden_activation"], config["tie_word_embeddings"]
    config.update(hidden_act="gelu", attention_bias=False, attention_dropout=0.0,
                  initializer_range=0.02, rope_scaling=None, use_cache=True,
                  transformers_version="4.38.0.dev0")
    return dict(sorted(config.items()))


class RandomTensor:
    """A seeded random bfloat16 tensor, drawn only when safetensors.write reads its bytes.

    This keeps one tensor in memory at a time instead of a whole 5 GB shard. Each tensor has its
    own random stream (seed, position in the checkpoint), so its values do not depend on the order
    of writing.
    """
    dtype = np.dtype("<u2")  # bfloat16 bits, as minigemma.safetensors stores them

    def __init__(self, seed, index, name, shape, embed_std):
        self.seed, self.index, self.shape = seed, index, shape
        self.std = weight_std(name, shape, embed_std)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        return random_bf16(np.random.default_rng([self.seed, self.index]), self.shape, self.std)


def split_into_shards(tensors):
    """[{name: tensor}] filled in order, a new shard whenever the next tensor would pass 5 GB."""
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    return shards


def write_checkpoint(out, shape, seed):
    """Write the whole checkpoint to `out`; the marker file goes last, once everything is there."""
    config = PRESETS[shape]()
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    embed_std = config.d_model ** -0.5  # embedding x sqrt(D) starts the residual stream at std 1
    tensors = {name: RandomTensor(seed, i, name, dims, embed_std)
               for i, (name, dims) in enumerate(expected_shapes(config).items())}
    shards = split_into_shards(tensors)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        started = time.perf_counter()
        safetensors.write(os.path.join(out, filename), shard, {"format": "pt"})
        print(f"  {filename}: {len(shard)} tensors, {sum(t.nbytes for t in shard.values()):,} bytes "
              f"in {time.perf_counter() - started:.1f} s", flush=True)
        weight_map.update({name: filename for name in shard})
    total = sum(t.nbytes for t in tensors.values())
    write_json(os.path.join(out, INDEX),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    write_json(os.path.join(out, "config.json"), repo_config(config))
    files = sorted(set(weight_map.values()) | {INDEX, "config.json"})
    write_json(marker, {"shape": shape, "seed": seed,
                        "files": {f: os.path.getsize(os.path.join(out, f)) for f in files}})


def write_json(path, data):
    """Write a JSON file atomically (a temporary file, then rename), as safetensors.write does."""
    with open(path + ".partial", "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(path + ".partial", path)


def is_complete(out, shape, seed):
    """True if `out` holds a finished checkpoint of this shape and seed, every file at its size."""
    try:
        with open(os.path.join(out, MARKER)) as f:
            marker = json.load(f)
        return (marker["shape"] == shape and marker["seed"] == seed and all(
            os.path.getsize(os.path.join(out, f)) == size for f, size in marker["files"].items()))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_tokenizer(out, vocab_size):
    """The tiny tokenizer padded to the checkpoint's vocabulary, unless OUT_DIR has one."""
    path = os.path.join(out, "tokenizer.model")
    if not os.path.exists(path):
        pad_tokenizer(train_tiny_tokenizer(path + ".tiny"), path, vocab_size)
        os.remove(path + ".tiny")


def ensure(out, shape="2b", seed=0):
    """The random checkpoint of `shape` and `seed` in `out`: kept if complete, else written."""
    if is_complete(out, shape, seed):
        print(f"{out}: complete gemma-{shape}-shape checkpoint with seed {seed}, kept")
    else:
        print(f"writing a random gemma-{shape}-shape checkpoint (seed {seed}) to {out}")
        started = time.perf_counter()
        write_checkpoint(out, shape, seed)
        print(f"done in {time.perf_counter() - started:.1f} s")
    write_tokenizer(out, PRESETS[shape]().vocab_size)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minigemma.random_checkpoint",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", help="output directory (default: gemma-SHAPE-shape "
                        "in $MINIGEMMA_CACHE, $XDG_CACHE_HOME/minigemma or ~/.cache/minigemma)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=sorted(PRESETS), default="2b")
    args = parser.parse_args(argv)
    ensure(args.out_dir or default_dir(args.shape), args.shape, args.seed)


if __name__ == "__main__":
    main()
