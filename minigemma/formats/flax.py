"""Read the official Flax checkpoints of Gemma 1 (Kaggle's "Flax" variations, written by Orbax) into
the tensors of the Hugging Face contract, with NumPy and TensorStore: no JAX, no Orbax.

An Orbax checkpoint directory stores a tree of parameters. Each leaf is a zarr array (version 2,
or 3 when asked for) written by TensorStore, named "<module path>.<leaf>": either a directory of
its own per leaf, or, since Orbax made OCDBT its default, a key in one key-value database
(manifest.ocdbt, d/). Gemma 1's tree, as
google-deepmind/gemma 1.0.0 defines it (gemma/modules.py, params.py), is

    transformer/embedder.input_embedding             [V, D]
    transformer/final_norm.scale                     [D]
    transformer/layer_{i}/pre_attention_norm.scale   [D]
    transformer/layer_{i}/attn/q_einsum.w            [N, D, H]      when K < N (2B)
    transformer/layer_{i}/attn/kv_einsum.w           [2, K, D, H]   keys, values (2B)
    transformer/layer_{i}/attn/qkv_einsum.w          [3, N, D, H]   q, k, v when K = N (7B)
    transformer/layer_{i}/attn/attn_vec_einsum.w     [N, H, D]
    transformer/layer_{i}/pre_ffw_norm.scale         [D]
    transformer/layer_{i}/mlp/gating_einsum.w        [2, D, F]      GELU gate, linear (up) branch
    transformer/layer_{i}/mlp/linear.w               [F, D]

Weights are stored [in, out] per head; Hugging Face's are torch Linear [out, in]: every projection
is transposed, and the heads are laid out row after row. Norm scales are the raw w, as in Hugging
Face. The checkpoint holds no config: the shapes give V, D, L, N, K, H, F, and the rest (RoPE base
10000, RMSNorm epsilon 1e-6) is fixed in the official code. Shape legend: see config.py.

Reading needs the `tensorstore` package (NumPy only): pip install "minigemma[flax]".
"""

import os
import re

import numpy as np

from ..errors import CheckpointNotFoundError, OrbaxCheckpointError

try:
    import tensorstore as ts
except ModuleNotFoundError:
    raise ModuleNotFoundError("minigemma.formats.flax reads Orbax checkpoints with the tensorstore "
                              "package: pip install \"minigemma[flax]\"") from None

# Gemma 1's context length (Gemma report); the official code itself sets no limit.
MAX_POSITIONS = 8192
# The file that describes each zarr array -> TensorStore's driver for it.
ZARR_DRIVERS = {".zarray": "zarr", "zarr.json": "zarr3"}
EMBEDDING = "transformer/embedder.input_embedding"
LAYER = "transformer/layer_{}/"


def read(path):
    """(config.json-style dict, {Hugging Face name: array}) of an Orbax Gemma 1 checkpoint.

    Arrays are read into memory (zarr chunks are compressed, so nothing can be memory-mapped) in
    their stored dtype: bfloat16 as uint16 bit patterns, float16, float32.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: not an Orbax checkpoint directory")
    leaves = read_leaves(path)
    dims = dimensions(leaves, path)
    check_leaves(leaves, dims, path)
    tensors = to_hugging_face(leaves, dims)
    return hf_config(dims, tensors["model.embed_tokens.weight"].dtype), tensors


# ----------------------------------------------------------------------------------------------
# The leaves, as TensorStore reads them


def read_leaves(path):
    """{leaf name, e.g. "transformer/final_norm.scale": array} of every zarr array in `path`."""
    root = os.path.abspath(path)
    if os.path.exists(os.path.join(root, "manifest.ocdbt")):  # one database holds every leaf
        spec = {"driver": "ocdbt", "base": f"file://{root}/"}
    else:                                                      # one directory per leaf
        spec = {"driver": "file", "path": f"{root}/"}
    try:
        store = ts.KvStore.open(spec).result()
        keys = store.list().result()
    except ValueError as e:
        raise OrbaxCheckpointError(f"{path}: cannot list the arrays of this checkpoint "
                                   f"({e})") from None
    drivers = {}  # {leaf name: zarr driver}
    for key in keys:
        name, _, file = key.decode().rpartition("/")
        if file in ZARR_DRIVERS:
            drivers[name] = ZARR_DRIVERS[file]
    if not drivers:
        raise OrbaxCheckpointError(f"{path}: no zarr arrays inside, so not an Orbax checkpoint; "
                                   f"expected the leaves of a Gemma parameter tree, e.g. "
                                   f"{EMBEDDING}")
    return {name: read_leaf(store, name, drivers[name], path) for name in sorted(drivers)}


def read_leaf(store, name, driver, path):
    """One zarr array of the checkpoint, bfloat16 as uint16 bits."""
    try:
        array = ts.open({"driver": driver}, kvstore=store / f"{name}/", open=True).result()
        array = array.read().result()
    except ValueError as e:
        raise OrbaxCheckpointError(f"{path}: leaf {name} cannot be read ({e})") from None
    if array.dtype.name == "bfloat16":  # NumPy has no bfloat16: keep the bits, as safetensors.py
        return array.view(np.uint16)
    if array.dtype not in (np.float32, np.float16):
        raise OrbaxCheckpointError(f"{path}: leaf {name} has dtype {array.dtype}; Gemma weights "
                                   f"are bfloat16, float16 or float32")
    return array


# ----------------------------------------------------------------------------------------------
# Gemma 1's tree: dimensions, expected shapes, and the mapping to Hugging Face names


def leaf_shape(leaves, name, path):
    if name not in leaves:
        raise OrbaxCheckpointError(f"{path}: leaf {name} is missing; not a Gemma 1 checkpoint "
                                   f"in the layout of google-deepmind/gemma")
    return leaves[name].shape


def shape_of(leaves, name, layout, path):
    """The shape of a leaf that must exist with one dimension per letter of `layout`, e.g. "NHD"."""
    shape = leaf_shape(leaves, name, path)
    if len(shape) != len(layout):
        raise OrbaxCheckpointError(f"{path}: leaf {name} has shape {shape}, expected "
                                   f"[{', '.join(layout)}]")
    return shape


def dimensions(leaves, path):
    """{V, D, L, N, K, H, F, "qkv"} read off the embedding and layer 0, as the official
    TransformerConfig.from_params does."""
    V, D = shape_of(leaves, EMBEDDING, "VD", path)
    layers = {int(m.group(1)) for m in map(re.compile(r"transformer/layer_(\d+)/").match, leaves)
              if m}
    if not layers or layers != set(range(len(layers))):
        raise OrbaxCheckpointError(f"{path}: layers {sorted(layers)}; expected layer_0 to "
                                   f"layer_{{L-1}}, each under transformer/")
    first = LAYER.format(0)
    N, H, _ = shape_of(leaves, first + "attn/attn_vec_einsum.w", "NHD", path)
    F, _ = shape_of(leaves, first + "mlp/linear.w", "FD", path)
    qkv = first + "attn/qkv_einsum.w" in leaves  # K = N: one einsum makes q, k and v (7B)
    K = N if qkv else shape_of(leaves, first + "attn/kv_einsum.w", "2KDH", path)[1]
    return dict(V=V, D=D, L=len(layers), N=N, K=K, H=H, F=F, qkv=qkv)


def expected_shapes(d):
    """{leaf name: shape} of Gemma 1's tree with dimensions d."""
    D, N, K, H, F = d["D"], d["N"], d["K"], d["H"], d["F"]
    shapes = {EMBEDDING: (d["V"], D), "transformer/final_norm.scale": (D,)}
    for i in range(d["L"]):
        p = LAYER.format(i)
        if d["qkv"]:
            shapes[p + "attn/qkv_einsum.w"] = (3, N, D, H)
        else:
            shapes[p + "attn/q_einsum.w"] = (N, D, H)
            shapes[p + "attn/kv_einsum.w"] = (2, K, D, H)
        shapes.update({
            p + "pre_attention_norm.scale": (D,),
            p + "attn/attn_vec_einsum.w": (N, H, D),
            p + "pre_ffw_norm.scale": (D,),
            p + "mlp/gating_einsum.w": (2, D, F),
            p + "mlp/linear.w": (F, D),
        })
    return shapes


def check_leaves(leaves, dims, path):
    """Raise an OrbaxCheckpointError naming the first leaf missing, unexpected or misshapen."""
    expected = expected_shapes(dims)
    for name, shape in expected.items():
        found = leaf_shape(leaves, name, path)
        if found == shape:
            continue
        if name.endswith("gating_einsum.w") and found == (2, shape[2], shape[1]):
            # Later Gemma generations store it [2, F, D] (transpose_gating_einsum); Gemma 1 never.
            raise OrbaxCheckpointError(f"{path}: leaf {name} has shape {found}, the transposed "
                                       f"[2, F, D] layout of later Gemma generations; Gemma 1 "
                                       f"stores [2, D, F] = {shape}")
        raise OrbaxCheckpointError(f"{path}: leaf {name} has shape {found}, expected {shape} "
                                   f"(D={dims['D']}, N={dims['N']}, K={dims['K']}, "
                                   f"H={dims['H']}, F={dims['F']} from layer 0)")
    unexpected = sorted(set(leaves) - set(expected))
    if unexpected:
        raise OrbaxCheckpointError(f"{path}: unexpected leaf {unexpected[0]} (not part of Gemma 1)")


def heads_to_rows(w):
    """[heads, D, H] (in, out per head) -> [heads*H, D], torch Linear's [out, in]."""
    heads, D, H = w.shape
    return np.ascontiguousarray(w.transpose(0, 2, 1).reshape(heads * H, D))


def to_hugging_face(leaves, d):
    """{Hugging Face name: array} from the leaves of a checked Gemma 1 tree. Leaves are taken out
    of `leaves` a layer at a time, so the weights are held about once, not twice, in memory."""
    N, H, D = d["N"], d["H"], d["D"]
    tensors = {"model.embed_tokens.weight": leaves.pop(EMBEDDING),
               "model.norm.weight": leaves.pop("transformer/final_norm.scale")}
    for i in range(d["L"]):
        prefix = LAYER.format(i)
        leaf = {n[len(prefix):]: leaves.pop(n) for n in list(leaves) if n.startswith(prefix)}
        if d["qkv"]:
            q, k, v = leaf["attn/qkv_einsum.w"]             # each [N, D, H]
        else:
            q, (k, v) = leaf["attn/q_einsum.w"], leaf["attn/kv_einsum.w"]  # [N|K, D, H]
        gate, up = leaf["mlp/gating_einsum.w"]              # each [D, F]: index 0 goes through GELU
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": leaf["pre_attention_norm.scale"],
            p + "self_attn.q_proj.weight": heads_to_rows(q),                  # [N*H, D]
            p + "self_attn.k_proj.weight": heads_to_rows(k),                  # [K*H, D]
            p + "self_attn.v_proj.weight": heads_to_rows(v),                  # [K*H, D]
            # [N, H, D] sums over heads and head_dim: one [D, N*H] matrix, heads side by side.
            p + "self_attn.o_proj.weight": np.ascontiguousarray(
                leaf["attn/attn_vec_einsum.w"].reshape(N * H, D).T),
            # Flax calls the pre-FFN norm pre_ffw_norm; Hugging Face post_attention_layernorm.
            p + "post_attention_layernorm.weight": leaf["pre_ffw_norm.scale"],
            p + "mlp.gate_proj.weight": np.ascontiguousarray(gate.T),        # [F, D]
            p + "mlp.up_proj.weight": np.ascontiguousarray(up.T),            # [F, D]
            p + "mlp.down_proj.weight": np.ascontiguousarray(leaf["mlp/linear.w"].T),  # [D, F]
        })
    return tensors


def hf_config(d, dtype):
    """The config.json a Hugging Face GemmaForCausalLM of these dimensions would carry."""
    names = {np.dtype(np.uint16): "bfloat16", np.dtype(np.float16): "float16",
             np.dtype(np.float32): "float32"}
    return {"architectures": ["GemmaForCausalLM"], "model_type": "gemma",
            "vocab_size": d["V"], "hidden_size": d["D"], "num_hidden_layers": d["L"],
            "num_attention_heads": d["N"], "num_key_value_heads": d["K"], "head_dim": d["H"],
            "intermediate_size": d["F"], "max_position_embeddings": MAX_POSITIONS,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
            "torch_dtype": names[np.dtype(dtype)], "tie_word_embeddings": True}
