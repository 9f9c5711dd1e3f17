"""Write seeded random weights in the exact file layout of the google/gemma-2b (or -7b) repository.

    python scripts/make_2b_shape_checkpoint.py [OUT_DIR] [--seed N] [--shape 2b|7b]

OUT_DIR receives what downloading the Hugging Face repo gives: config.json as the repo has it, the bfloat16 weights in shards model-0000k-of-0000n.safetensors and the index
model.safetensors.index.json (weight_map, metadata.total_size = 5,012,344,832 bytes for 2B). The
tensor names and shapes are those of gemma1-spec section 3.2; there is no lm_head (it is tied).
The weights are random, so the model says nothing sensible: the files exist to test loading and
numerics at the true size. The tokenizer.model is the tiny tokenizer of scripts/tiny_tokenizer.py
padded to 256000 pieces, so that `minigemma generate --weights OUT_DIR` runs (and times) the CLI. Never commit them (5 GB for 2B, 17 GB for 7B).

Default OUT_DIR: $MINIGEMMA_CACHE/gemma-2b-shape, or ~/.cache/minigemma/gemma-2b-shape.
A directory that already holds a complete checkpoint of the same shape and seed is kept as is.
Tensors are drawn and written one at a time (at most ~2 GB of memory, for the 2B embedding).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from minigemma.formats import safetensors  # noqa: E402
from minigemma.checkpoint import expected_shapes  # noqa: E402
from minigemma.config import gemma_2b, gemma_7b  # noqa: E402
from random_checkpoint import hf_config, random_bf16, weight_std  # noqa: E402
from tiny_tokenizer import pad_tokenizer, train_tiny_tokenizer  # noqa: E402

PRESETS = {"2b": gemma_2b, "7b": gemma_7b}
# save_pretrained's max_shard_size="5GB" when the Gemma repos were made: 2 shards for 2B, 4 for 7B.
MAX_SHARD_BYTES = 5_000_000_000
INDEX = "model.safetensors.index.json"
MARKER = "minigemma-random.json"  # written last: seed, shape and file sizes of a complete checkpoint


def default_dir(shape="2b"):
    """Where tests and benchmarks keep the generated checkpoint (outside the repository)."""
    cache = os.environ.get("MINIGEMMA_CACHE", os.path.join("~", ".cache", "minigemma"))
    return os.path.join(os.path.expanduser(cache), f"gemma-{shape}-shape")


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", help="output directory (default: "
                        "$MINIGEMMA_CACHE/gemma-SHAPE-shape or ~/.cache/minigemma/gemma-SHAPE-shape)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=sorted(PRESETS), default="2b")
    args = parser.parse_args(argv)
    out = args.out_dir or default_dir(args.shape)
    if is_complete(out, args.shape, args.seed):
        print(f"{out}: complete gemma-{args.shape}-shape checkpoint with seed {args.seed}, kept")
    else:
        print(f"writing a random gemma-{args.shape}-shape checkpoint (seed {args.seed}) to {out}")
        started = time.perf_counter()
        write_checkpoint(out, args.shape, args.seed)
        print(f"done in {time.perf_counter() - started:.1f} s")
    write_tokenizer(out, PRESETS[args.shape]().vocab_size)


if __name__ == "__main__":
    main()
