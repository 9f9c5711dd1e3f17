"""The official Flax Gemma code (gemma-llm 1.0.0) and its Orbax checkpoints, against minigemma.

Checkpoints: transformers' save_pretrained writes a seeded random GemmaForCausalLM (every tensor,
norms included, random; conftest.py); Orbax itself, in .venv-flax (scripts/flax_peer.py save),
writes the same weights as gemma-llm's parameter tree, the layout of the Kaggle checkpoints.

- minigemma.formats.flax.read gives back every tensor of the save_pretrained directory, bit for
  bit, and a config equal to its config.json;
- minigemma on the Orbax checkpoint agrees with transformers on the save_pretrained one:
  max |dlogit| / max |logit| <= 1e-5;
- the official Flax code on the Orbax checkpoint agrees with a minigemma golden of the
  save_pretrained directory at every activation point and in the logits, max |diff| / max |golden|
  <= 1e-5. This also proves the test's Hugging Face -> Flax layout (flax_tree) is the official one.

Needs .venv-flax (bash scripts/setup_flax_venv.sh); skipped, with that reason, without it.
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import minigemma.golden
from minigemma.checkpoint import check_weights
from minigemma.config import from_hf_config
from minigemma.golden import diff
from minigemma.model import Gemma, activation_points, upcast
from helpers import prompt, rel_diff
from hf_peer import TINY, load_peer, peer_logits, random_gemma, save_checkpoint

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
FLAX_PYTHON = os.path.join(REPO, ".venv-flax", "bin", "python")
PEER = os.path.join(REPO, "scripts", "flax_peer.py")
REL_TOL = 1e-5

if not os.path.exists(FLAX_PYTHON):
    pytest.skip(f"{FLAX_PYTHON} does not exist: build it with `bash scripts/setup_flax_venv.sh` "
                f"to test against the official Flax code", allow_module_level=True)

from minigemma.formats.flax import OrbaxCheckpointError, read  # noqa: E402 (needs tensorstore)

# "padded": the Flax checkpoints' 256128 embedding rows (256000 tokens + 128 padding rows), whose
# logits past 256000 are not compared; multi-query, D = 32.
CONFIGS = {**TINY, "padded": dict(TINY["mqa"], vocab_size=256128, hidden_size=32,
                                  intermediate_size=64)}
# (config, storage, Orbax layout): OCDBT (Orbax's default) and a zarr directory per leaf, each
# with both storage dtypes, for multi-query (K = 1, the 2B's q_einsum + kv_einsum) and multi-head
# (K = N, the 7B's qkv_einsum); zarr version 3 arrays in OCDBT for grouped (K = 2), which is read
# too, though gemma-llm 1.0.0 cannot run it (it repeats the kv heads N times).
CASES = [("mqa", "f32", "ocdbt"), ("mqa", "bf16", "zarr"), ("mha", "f32", "zarr"),
         ("mha", "bf16", "ocdbt"), ("gqa", "bf16", "zarr3"), ("padded", "bf16", "ocdbt")]
PEER_CASES = [("mqa", "f32", "ocdbt"), ("mha", "bf16", "ocdbt"),
              ("padded", "bf16", "ocdbt")]  # ~10 s each


def case_id(case):
    return "-".join(case)


PROMPTS = [{"name": "bos", "ids": [2]}, {"name": "short", "ids": prompt(7, seed=0).tolist()},
           {"name": "long", "ids": prompt(40, seed=1).tolist()}]


# ----------------------------------------------------------------------------------------------
# Writing the Orbax checkpoints: the Hugging Face tensors in gemma-llm's tree, saved by Orbax


def hf_tensors(directory):
    """{name: array} of a save_pretrained directory as transformers reads it, in the stored
    dtype (bfloat16 as uint16 bits)."""
    out = {}
    for name, t in load_file(os.path.join(directory, "model.safetensors")).items():
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        out[name] = t.numpy().view(np.uint16) if t.dtype == torch.int16 else t.numpy()
    return out


def flax_tree(hf, kwargs):
    """gemma-llm's parameter tree of the Hugging Face tensors: {"<module path>/<leaf>": float32}.
    Hugging Face weights are torch Linear [out, in]; Flax's are [in, out] per head."""
    N, K, H = kwargs["num_attention_heads"], kwargs["num_key_value_heads"], kwargs["head_dim"]
    D = kwargs["hidden_size"]
    w = {name: upcast(a) for name, a in hf.items()}

    def per_head(m, heads):  # [heads*H, D] -> [heads, D, H]
        return m.reshape(heads, H, D).transpose(0, 2, 1)

    tree = {"transformer/embedder/input_embedding": w["model.embed_tokens.weight"],
            "transformer/final_norm/scale": w["model.norm.weight"]}
    for i in range(kwargs["num_hidden_layers"]):
        p, f = f"model.layers.{i}.", f"transformer/layer_{i}/"
        q, k, v = (w[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        if K == N:
            tree[f + "attn/qkv_einsum/w"] = np.stack([per_head(q, N), per_head(k, N),
                                                      per_head(v, N)])
        else:
            tree[f + "attn/q_einsum/w"] = per_head(q, N)
            tree[f + "attn/kv_einsum/w"] = np.stack([per_head(k, K), per_head(v, K)])
        tree.update({
            f + "pre_attention_norm/scale": w[p + "input_layernorm.weight"],
            f + "attn/attn_vec_einsum/w": w[p + "self_attn.o_proj.weight"].T.reshape(N, H, D),
            f + "pre_ffw_norm/scale": w[p + "post_attention_layernorm.weight"],
            f + "mlp/gating_einsum/w": np.stack([w[p + "mlp.gate_proj.weight"].T,
                                                 w[p + "mlp.up_proj.weight"].T]),
            f + "mlp/linear/w": w[p + "mlp.down_proj.weight"].T,
        })
    return tree


def orbax_save(tree, directory, dtype="float32", layout="ocdbt"):
    """Write `tree` with Orbax in .venv-flax -> the checkpoint directory."""
    params = f"{directory}.npz"
    np.savez(params, **tree)
    args = [FLAX_PYTHON, PEER, "save", params, directory, "--dtype", dtype]
    run_flax(args + {"ocdbt": [], "zarr": ["--no-ocdbt"], "zarr3": ["--zarr3"]}[layout])
    return directory


def run_flax(args):
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tmp_path_factory):
    """{case: (save_pretrained directory, Orbax directory of the same weights)}."""
    hf_dirs = dict(tiny_checkpoints)
    padded = tmp_path_factory.mktemp("padded-bf16")
    hf_dirs["padded", "bf16"] = str(save_checkpoint(random_gemma(CONFIGS["padded"], seed=7),
                                                     padded, torch.bfloat16))
    out = {}
    for name, storage, layout in CASES:
        hf_dir = hf_dirs[name, storage]
        tree = flax_tree(hf_tensors(hf_dir), CONFIGS[name])
        directory = str(tmp_path_factory.mktemp("orbax") / f"{name}-{storage}-{layout}")
        dtype = {"f32": "float32", "bf16": "bfloat16"}[storage]
        out[name, storage, layout] = hf_dir, orbax_save(tree, directory, dtype, layout)
    return out


# ----------------------------------------------------------------------------------------------
# The reader


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reader_gives_every_hugging_face_tensor_bit_for_bit(checkpoints, case):
    hf_dir, orbax_dir = checkpoints[case]
    config, tensors = read(orbax_dir)
    expected = hf_tensors(hf_dir)
    assert sorted(tensors) == sorted(expected)
    for name, want in expected.items():
        got = tensors[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert np.array_equal(got, want), name
    with open(os.path.join(hf_dir, "config.json")) as f:
        assert from_hf_config(config) == from_hf_config(json.load(f))
    assert config["torch_dtype"] == {"f32": "float32", "bf16": "bfloat16"}[case[1]]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_minigemma_on_orbax_matches_transformers(checkpoints, case):
    hf_dir, orbax_dir = checkpoints[case]
    hf_config, tensors = read(orbax_dir)
    config = from_hf_config(hf_config, source=orbax_dir)
    check_weights(tensors, config, orbax_dir)
    model, peer = Gemma(config, tensors), load_peer(hf_dir)
    V = min(CONFIGS[case[0]]["vocab_size"], 256000)  # real tokens; transformers scores padding too
    for p in PROMPTS:
        ours, ref = model.forward(p["ids"]), peer_logits(peer, p["ids"])[:, :V]
        assert ours.shape == ref.shape
        rel = rel_diff(ours, ref)
        assert rel <= REL_TOL, f"{case_id(case)}/{p['name']}: max rel {rel:.3g}"


# ----------------------------------------------------------------------------------------------
# The official Flax code


@pytest.mark.parametrize("case", PEER_CASES, ids=case_id)
def test_official_flax_code_matches_minigemma_golden(checkpoints, case, tmp_path):
    hf_dir, orbax_dir = checkpoints[case]
    golden_dir = minigemma.golden.record(hf_dir, PROMPTS, str(tmp_path / "golden"),
                                         activations=True, new_tokens=4)
    out = str(tmp_path / "flax.npz")
    run_flax([FLAX_PYTHON, PEER, "run", golden_dir, orbax_dir, out])
    golden = minigemma.golden.load(golden_dir)
    report = diff(golden, out, tol=REL_TOL)
    assert report.first is None, str(report)
    points = activation_points(CONFIGS[case[0]]["num_hidden_layers"])
    assert [(r.prompt, r.point) for r in report.rows] == \
        [(p["name"], point) for p in PROMPTS for point in points]  # every point was compared
    with np.load(out) as flax:
        for p in PROMPTS:
            assert flax[f"{p['name']}/logits"].shape == golden.arrays[f"{p['name']}/logits"].shape
            rel = rel_diff(flax[f"{p['name']}/logits"], golden.arrays[f"{p['name']}/logits"])
            assert rel <= REL_TOL, f"{case_id(case)}/{p['name']}: logits max rel {rel:.3g}"


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error naming the directory and the leaf


@pytest.fixture(scope="module")
def mqa_tree(tiny_checkpoints):
    return flax_tree(hf_tensors(tiny_checkpoints["mqa", "f32"]), TINY["mqa"])


def test_not_an_orbax_directory(tiny_checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an Orbax checkpoint directory"):
        read(tmp_path / "missing")
    with pytest.raises(OrbaxCheckpointError, match="no zarr arrays inside"):
        read(tiny_checkpoints["mqa", "f32"])  # a Hugging Face directory


def test_missing_leaf_is_named(mqa_tree, tmp_path):
    tree = {k: v for k, v in mqa_tree.items() if k != "transformer/layer_1/mlp/linear/w"}
    directory = orbax_save(tree, str(tmp_path / "ckpt"))
    with pytest.raises(OrbaxCheckpointError, match="leaf transformer/layer_1/mlp/linear.w is "
                                                   "missing"):
        read(directory)


def test_misshapen_leaf_is_named(mqa_tree, tmp_path):
    tree = dict(mqa_tree)
    tree["transformer/layer_1/attn/q_einsum/w"] = tree["transformer/layer_1/attn/q_einsum/w"][:3]
    directory = orbax_save(tree, str(tmp_path / "ckpt"))
    with pytest.raises(OrbaxCheckpointError, match=r"leaf transformer/layer_1/attn/q_einsum.w has "
                                                   r"shape \(3, 64, 32\), expected \(4, 64, 32\)"):
        read(directory)


def test_transposed_gating_einsum_is_not_gemma_1(mqa_tree, tmp_path):
    tree = {k: v.transpose(0, 2, 1) if k.endswith("gating_einsum/w") else v
            for k, v in mqa_tree.items()}
    directory = orbax_save(tree, str(tmp_path / "ckpt"))
    with pytest.raises(OrbaxCheckpointError, match=r"gating_einsum.w has shape \(2, 128, 64\), "
                                                   r"the transposed \[2, F, D\] layout"):
        read(directory)


def test_unexpected_leaf_is_named(mqa_tree, tmp_path):
    tree = {**mqa_tree, "transformer/layer_0/post_ffw_norm/scale": np.zeros(64, np.float32)}
    directory = orbax_save(tree, str(tmp_path / "ckpt"))
    with pytest.raises(OrbaxCheckpointError, match="unexpected leaf "
                                                   "transformer/layer_0/post_ffw_norm.scale"):
        read(directory)


def test_leaf_of_the_wrong_rank_is_named(mqa_tree, tmp_path):
    tree = dict(mqa_tree)
    name = "transformer/layer_0/attn/attn_vec_einsum/w"
    tree[name] = tree[name].reshape(4 * 32, 64)
    directory = orbax_save(tree, str(tmp_path / "ckpt"))
    with pytest.raises(OrbaxCheckpointError, match=r"leaf transformer/layer_0/attn/attn_vec_einsum"
                                                   r".w has shape \(128, 64\), expected "
                                                   r"\[N, H, D\]"):
        read(directory)


def test_corrupt_leaf_is_named(checkpoints, tmp_path):
    directory = shutil.copytree(checkpoints["mqa", "bf16", "zarr"][1], tmp_path / "ckpt")
    with open(directory / "transformer/layer_0/mlp/linear.w/0.0", "wb") as f:
        f.write(b"not zstd")
    with pytest.raises(OrbaxCheckpointError, match="leaf transformer/layer_0/mlp/linear.w cannot "
                                                   "be read"):
        read(directory)
