"""The official JAX/Flax Gemma code (gemma-llm 1.0.0, google-deepmind/gemma at its first release)
as a peer of minigemma, and Orbax as the writer of test checkpoints.

Runs inside .venv-flax (built by scripts/setup_flax_venv.sh). It never imports minigemma, whose
dependencies need NumPy 2: goldens are read with json and numpy alone.

    .venv-flax/bin/python scripts/flax_peer.py run GOLDEN CHECKPOINT OUT.npz
    .venv-flax/bin/python scripts/flax_peer.py save PARAMS.npz OUT [--dtype D --no-ocdbt --zarr3]

run   loads the Orbax CHECKPOINT the official way (gemma.params.load_and_format_params), runs
      gemma's transformer.Transformer in float32 over the token ids of every prompt of the golden
      (positions 0..T-1, causal mask, no cache) and writes OUT.npz: "<prompt>/tokens",
      "<prompt>/logits" [T, V] and every activation under minigemma's point names
      (activation_points in minigemma/model.py), ready for `minigemma golden diff GOLDEN OUT.npz`.
save  writes a parameter tree with Orbax's PyTreeCheckpointer, in the layout of the Kaggle Gemma
      checkpoints: {"transformer/layer_0/attn/q_einsum": {"w": array}, ...}. PARAMS.npz names
      each leaf "<module path>/<leaf>", e.g. "transformer/layer_0/attn/q_einsum/w".

Shape legend: T tokens, D d_model, N query heads, K kv heads, H head_dim, V vocab.
"""

import argparse
import contextlib
import functools
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint  # noqa: E402
from gemma import params as params_lib  # noqa: E402
from gemma import positional_embeddings  # noqa: E402
from gemma import transformer as transformer_lib  # noqa: E402

# The Flax checkpoints carry 256128 embedding rows; Gemma 1's tokenizer has 256000 pieces, and the
# rows past them are padding: their logits are not part of any golden.
PADDED_VOCAB, TOKENIZER_VOCAB = 256128, 256000


# ----------------------------------------------------------------------------------------------
# run: the official forward pass, with every intermediate activation recorded


def load_params(checkpoint):
    """The official loader's nested parameter tree, widened to float32 (bfloat16 widens exactly)."""
    params = params_lib.load_and_format_params(os.path.abspath(checkpoint))
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens):
    """(logits [1, T, num_embed], {point: activation}) of one unpadded sequence [1, T] at
    positions 0..T-1, called as the official tests call the Transformer without a cache, with
    the causal mask of transformer.make_causal_attn_mask. Compiled, as the official sampler runs."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]          # [1, T]
    mask = transformer_lib.make_causal_attn_mask(jnp.ones(tokens.shape, jnp.bool_))  # [1, T, T]
    with recording({}) as points:
        logits, _ = model.apply({"params": params["transformer"]}, tokens, positions, None, mask)
    return logits, points


@contextlib.contextmanager
def recording(points):
    """Record the activations of the official modules into `points` {name: array}, without
    changing what they compute: a Flax method interceptor sees each module's inputs and outputs,
    and a wrapper around positional_embeddings.apply_rope (a function, not a module) sees the
    rotated queries and keys. Arrays keep the batch axis of 1 and heads as [N, H]."""
    rope = positional_embeddings.apply_rope
    running = {}  # "layer": the layer whose Attention module runs; its RoPE calls belong to it

    def rope_recorder(inputs, positions, **kwargs):
        out = rope(inputs, positions, **kwargs)
        layer = running["layer"]
        # modules.Attention rotates the queries first, then the keys.
        name = f"{layer}.q_rope" if f"{layer}.q_rope" not in points else f"{layer}.k_rope"
        points[name] = out
        return out

    def interceptor(next_fun, args, kwargs, context):
        path, method = context.module.scope.path, context.method_name
        layer = f"layers.{path[0].split('_')[1]}" if path and path[0].startswith("layer_") else None
        inner = path[1:] if layer else path
        if inner == ("attn",) and method == "__call__":
            running["layer"] = layer
        out = next_fun(*args, **kwargs)
        if path == ("embedder",) and method == "encode":
            points["embed"] = out
        elif path == ("final_norm",):
            points["final_norm"] = out
        elif inner == ("pre_attention_norm",):
            points[f"{layer}.attn_norm"] = out
        elif inner == ("attn", "attn_vec_einsum"):
            points[f"{layer}.attn_out"] = args[1]                  # [1, T, N, H]: its input
        elif inner == ("pre_ffw_norm",):
            points[f"{layer}.resid_attn"] = args[0]                # its input: x + attention
            points[f"{layer}.ffn_norm"] = out
        elif inner == ("mlp",):
            points[f"{layer}.ffn_out"] = out
        elif inner == () and method == "__call__" and layer:
            points[f"{layer}.resid_block"] = out[1]                # Block returns (cache, x)
        return out

    positional_embeddings.apply_rope = rope_recorder
    try:
        with nn.intercept_methods(interceptor):
            yield points
    finally:
        positional_embeddings.apply_rope = rope


def real_vocab(num_embed):
    return TOKENIZER_VOCAB if num_embed == PADDED_VOCAB else num_embed


def run(golden_dir, checkpoint, out):
    with open(os.path.join(golden_dir, "golden.json"), encoding="utf-8") as f:
        prompts = json.load(f)["prompts"]
    params = load_params(checkpoint)
    config = transformer_lib.TransformerConfig.from_params(params)
    model = transformer_lib.Transformer(config)
    V = real_vocab(config.num_embed)
    arrays = {}
    for prompt in prompts:
        name, ids = prompt["name"], prompt["token_ids"]
        logits, points = forward(model, params, jnp.asarray([ids], jnp.int32))
        points["logits"] = logits[..., :V]                                    # real tokens only
        arrays[f"{name}/tokens"] = np.asarray(ids, np.int32)
        for point, value in points.items():
            arrays[f"{name}/{point}"] = np.asarray(value[0], np.float32)    # drop the batch axis
    np.savez(out, **arrays)
    print(f"{out}: {len(prompts)} prompts through gemma-llm 1.0.0 "
          f"(L={config.num_layers}, D={config.embed_dim}, N={config.num_heads}, "
          f"K={config.num_kv_heads}, H={config.head_dim}, V={config.num_embed})")


# ----------------------------------------------------------------------------------------------
# save: a parameter tree written by Orbax, as the Kaggle checkpoints are laid out


def save(params_npz, checkpoint, dtype, ocdbt, zarr3):
    tree = {}
    with np.load(params_npz) as npz:
        for name in npz.files:
            module, leaf = name.rsplit("/", 1)
            tree.setdefault(module, {})[leaf] = jnp.asarray(npz[name], dtype)
    handler = orbax.checkpoint.PyTreeCheckpointHandler(use_ocdbt=ocdbt, use_zarr3=zarr3)
    orbax.checkpoint.Checkpointer(handler).save(os.path.abspath(checkpoint), tree)
    layout = "OCDBT" if ocdbt else "a directory per leaf"
    print(f"{checkpoint}: {len(tree)} modules saved by orbax-checkpoint "
          f"{orbax.checkpoint.__version__} ({dtype}, {layout}, zarr {3 if zarr3 else 2})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    r = commands.add_parser("run", help="logits and activations of a golden's prompts")
    r.add_argument("golden", help="golden directory (golden.json + golden.npz)")
    r.add_argument("checkpoint", help="Orbax checkpoint directory")
    r.add_argument("out", help=".npz to write")
    s = commands.add_parser("save", help="write a parameter tree as an Orbax checkpoint")
    s.add_argument("params", help=".npz of leaves named '<module path>/<leaf>'")
    s.add_argument("checkpoint", help="Orbax checkpoint directory to create")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    s.add_argument("--no-ocdbt", dest="ocdbt", action="store_false",
                   help="one zarr directory per leaf, as orbax wrote before OCDBT")
    s.add_argument("--zarr3", action="store_true", help="zarr version 3 arrays (default: 2)")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.golden, args.checkpoint, args.out)
    else:
        save(args.params, args.checkpoint, jnp.dtype(args.dtype), args.ocdbt, args.zarr3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
