"""minigemma convert (minigemma/convert.py): every source format to a Hugging Face directory and to
a GGUF file, judged by the tools that read those formats.

Sources, all written by the real tools from one seeded random Gemma (every tensor random, norms
included; multi-query, N*H = 128 != D = 64; rows of 64 and 128 weights, whole Q8_0 blocks):
transformers' save_pretrained as float32, bfloat16 and float16 with the conformance pack's
tokenizer.model beside; torch.save in gemma_pytorch's layout as float32, bfloat16 and int8 + scale
per row (tests/test_pytorch_ckpt.py's helpers); llama.cpp's convert_hf_to_gguf.py as F32, BF16,
F16 and Q8_0 (tests/llama_cpp_tools.py).

What is checked, and against what:
  - a Hugging Face destination is read back by the safetensors library and by transformers'
    GemmaForCausalLM: stored tensors equal bit for bit (int8 and Q8_0: their dequantized float32
    values, computed by torch and by the gguf package), and transformers' logits on it equal,
    bit for bit, transformers' logits on a checkpoint it saved itself with those weights;
  - a GGUF destination equals, tensor bytes and metadata (every key but general.name and the
    conversion note), the file llama.cpp's own converter writes from the same checkpoint; llama.cpp
    runs it with minigemma's greedy tokens; minigemma reads it back with the source's values;
  - all or nothing: a failure, Ctrl-C or SIGTERM mid-write leaves no destination and no
    temporary file; an existing destination is kept unless force;
  - bad input: one clear error naming the path or argument.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import minigemma  # noqa: E402
from minigemma import llama_cpp_peer  # noqa: E402
from minigemma.config import config_from_hf  # noqa: E402
from minigemma.convert import ConvertError, convert  # noqa: E402
from minigemma.formats import gguf as gguf_reader  # noqa: E402
from minigemma.model import upcast  # noqa: E402
from helpers import bits, prompt, rel_diff, write_gguf  # noqa: E402
from hf_peer import (load_peer, peer_greedy, peer_logits, random_gemma, randomize,  # noqa: E402
                     save_checkpoint)
from llama_cpp_tools import convert_hf_to_gguf  # noqa: E402
from test_gguf import CONFIG as GGUF_CONFIG, good_tensors as gguf_good_tensors  # noqa: E402
from test_gemma3 import TINY as TINY_V2, load_peer as load_peer_v2  # noqa: E402
from test_pytorch_ckpt import (dequantized_peer, gemma_pytorch_state, quantize_state,  # noqa: E402
                               save_ckpt)
from transformers import (Gemma3Config, Gemma3ForCausalLM,  # noqa: E402
                          Gemma3ForConditionalGeneration)

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TOKENIZER = os.path.join(REPO, "tests", "conformance", "checkpoints", "tiny-mqa", "tokenizer.model")
CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=1, head_dim=32)
SEED = 31
PROMPT = prompt(12, seed=3)
NEW_TOKENS = 8
RTOL = 1e-5           # max |dlogit| / max |logit|, minigemma against transformers
LLAMA_ATOL = 1e-2     # llama.cpp on an F32 GGUF, f32 KV cache: measured 1.5e-3 - 1.6e-3 here (its
                      # float16 GELU table); minigemma's greedy margins are >= 0.046
SHARD = 20_000        # bytes: the embedding (512 x 64) and each layer's matrices get shards of
                      # their own, so every test of the Hugging Face layout sees an index
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Sources written by the real tools


def tiny_model():
    return random_gemma(CONFIG, seed=SEED)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{name: path}: "hf-f32" | "hf-bf16" | "hf-f16" (save_pretrained + tokenizer.model);
    "ckpt-f32" | "ckpt-bf16" | "ckpt-int8" (torch.save, gemma_pytorch layout, tokenizer.model
    beside) with "config" (their config.json), "int8-state" (the int8 state dict, torch) and
    "int8-peer" (save_pretrained of the int8 * scale weights); "gguf-F32" | "gguf-BF16" |
    "gguf-F16" | "gguf-Q8_0" (llama.cpp's converter)."""
    out, root = {}, tmp_path_factory.mktemp("sources")
    for storage, dtype in DTYPES.items():  # a fresh model each: saving rounds the model's weights
        out[f"hf-{storage}"] = str(save_checkpoint(tiny_model(), root / f"hf-{storage}", dtype))
        shutil.copy(TOKENIZER, root / f"hf-{storage}" / "tokenizer.model")
    model = tiny_model()
    model.config.to_json_file(root / "config.json")
    out["config"] = str(root / "config.json")
    state = gemma_pytorch_state(model)
    quantized = quantize_state(state)
    out["int8-peer"] = str(save_checkpoint(dequantized_peer(model, quantized), root / "int8-peer"))
    for storage, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        (root / f"ckpt-{storage}").mkdir()
        typed = {k: v if k == "freqs_cis" else v.to(dtype) for k, v in state.items()}
        out[f"ckpt-{storage}"] = str(save_ckpt(typed, root / f"ckpt-{storage}" / "model.ckpt"))
        shutil.copy(TOKENIZER, root / f"ckpt-{storage}" / "tokenizer.model")
    (root / "ckpt-int8").mkdir()
    out["ckpt-int8"] = str(save_ckpt(quantized, root / "ckpt-int8" / "model.ckpt"))
    shutil.copy(TOKENIZER, root / "ckpt-int8" / "tokenizer.model")
    out["int8-state"] = quantized
    for kind, storage, outtype in (("F32", "f32", "f32"), ("BF16", "bf16", "bf16"),
                                   ("F16", "f32", "f16"), ("Q8_0", "f32", "q8_0")):
        out[f"gguf-{kind}"] = convert_hf_to_gguf(out[f"hf-{storage}"],
                                                 str(root / f"tiny-{kind}.gguf"), outtype)
    return out


def read_safetensors(directory):
    """{name: NumPy array of the stored bits} of a Hugging Face directory, read by the
    safetensors library (torch), following the index when there is one."""
    from safetensors.torch import load_file

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for name in files:
        for key, t in load_file(os.path.join(directory, name)).items():
            out[key] = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 \
                else t.numpy()
    return out


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits(a), bits(b))


def is_norm(name):
    return name.endswith("norm.weight")


def one_plus(w):
    """float32 1 + w of a stored norm weight, as transformers and minigemma form it."""
    return np.float32(1) + upcast(np.asarray(w))


def gguf_tensors(path):
    """{name: (ggml type name, GGUF dims, bytes)} read by the gguf package's reader."""
    return {t.name: (t.tensor_type.name, [int(n) for n in t.shape],
                     np.asarray(t.data).reshape(-1).view(np.uint8).tobytes())
            for t in gguf.GGUFReader(path).tensors}


def gguf_fields(path):
    """{key: (value types, value)} read by the gguf package's reader."""
    return {key: (field.types, field.contents()) for key, field in
            gguf.GGUFReader(path).fields.items()}


def comparable(fields):
    """The fields that must equal the converter's: not the name (the converter titles the
    directory's), the note, or the header counts that count them."""
    return {k: v for k, v in fields.items() if k not in ("general.name", "minigemma.conversion",
                                                         "GGUF.kv_count")}


def minigemma_greedy(model, ids, n):
    """n greedy tokens of minigemma after ids (argmax, no stop on <eos>)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(model.forward(np.asarray(ids))[-1])))
    return ids[-n:]


def listing(directory):
    return sorted(os.listdir(directory))


def run(src, dst, **kwargs):
    """convert, its progress lines collected."""
    lines = []
    convert(src, dst, progress=lines.append, **kwargs)
    return lines


# ----------------------------------------------------------------------------------------------
# Hugging Face destination


@pytest.mark.parametrize("storage", ["f32", "bf16", "f16"])
def test_hf_to_hf_is_bit_exact_and_sharded(sources, tmp_path, storage):
    src, dst = sources[f"hf-{storage}"], str(tmp_path / "out")
    run(src, dst, max_shard_size=SHARD)
    with open(os.path.join(dst, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert listing(dst) == sorted(shards + ["config.json", "model.safetensors.index.json",
                                            "tokenizer.model"])
    ours, theirs = read_safetensors(dst), read_safetensors(src)
    assert set(ours) == set(index["weight_map"]) == set(theirs)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in theirs.values())
    for name, array in theirs.items():
        assert same_bits(ours[name], array), name
    for shard in shards:  # a shard passes the limit only when it is one tensor
        names = [n for n, s in index["weight_map"].items() if s == shard]
        assert len(names) == 1 or sum(ours[n].nbytes for n in names) <= SHARD, shard
    with open(TOKENIZER, "rb") as a, open(os.path.join(dst, "tokenizer.model"), "rb") as b:
        assert a.read() == b.read()
    with open(os.path.join(dst, "config.json")) as a, open(os.path.join(src, "config.json")) as b:
        assert config_from_hf(json.load(a)) == config_from_hf(json.load(b))
    assert np.array_equal(peer_logits(load_peer(dst), PROMPT), peer_logits(load_peer(src), PROMPT))


def test_hf_destination_runs_in_transformers_like_minigemma_on_the_source(sources, tmp_path):
    src, dst = sources["hf-bf16"], str(tmp_path / "out")
    run(src, dst, max_shard_size=SHARD)
    ours = minigemma.load(src)
    peer = load_peer(dst)
    assert rel_diff(ours.forward(PROMPT), peer_logits(peer, PROMPT)) <= RTOL
    assert peer_greedy(peer, PROMPT, NEW_TOKENS) == minigemma_greedy(ours, PROMPT, NEW_TOKENS)


@pytest.mark.parametrize("storage", ["f32", "bf16"])
def test_ckpt_to_hf_equals_save_pretrained(sources, tmp_path, storage):
    """gemma_pytorch's fused qkv_proj comes apart into q, k, v; every tensor has the bits
    save_pretrained stored for the same weights in the same dtype."""
    dst = str(tmp_path / "out")
    lines = run(sources[f"ckpt-{storage}"], dst, config=sources["config"])
    assert any("as stored, bit for bit" in line for line in lines)
    ours, theirs = read_safetensors(dst), read_safetensors(sources[f"hf-{storage}"])
    assert set(ours) == set(theirs)
    for name, array in theirs.items():
        assert same_bits(ours[name], array), name
    assert np.array_equal(peer_logits(load_peer(dst), PROMPT),
                          peer_logits(load_peer(sources[f"hf-{storage}"]), PROMPT))


def test_int8_ckpt_to_hf_is_its_dequantized_float32(sources, tmp_path):
    """int8 * scale per row, formed by torch, is what the directory holds, and says it holds."""
    dst = str(tmp_path / "out")
    lines = run(sources["ckpt-int8"], dst, config=sources["config"])
    assert any("int8+scale -> F32 (dequantized)" in line for line in lines)
    with open(os.path.join(dst, "config.json")) as f:
        note = json.load(f)["minigemma_conversion"]
    assert "gemma_pytorch checkpoint" in note and "int8+scale -> F32 (dequantized)" in note
    state = sources["int8-state"]
    deq = lambda name: (state[name].float() * state[name + "_scaler"][:, None]).numpy()
    N, K, H = (CONFIG[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    ours = read_safetensors(dst)
    expected = {"model.embed_tokens.weight": deq("embedder.weight"),
                "model.norm.weight": state["model.norm.weight"].numpy()}
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        qkv = deq(p + "self_attn.qkv_proj.weight")
        expected.update({p + "self_attn.q_proj.weight": qkv[:N * H],
                         p + "self_attn.k_proj.weight": qkv[N * H:(N + K) * H],
                         p + "self_attn.v_proj.weight": qkv[(N + K) * H:]})
        for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            expected[p + name + ".weight"] = deq(p + name + ".weight")
        for name in ("input_layernorm", "post_attention_layernorm"):
            expected[p + name + ".weight"] = state[p + name + ".weight"].numpy()
    assert set(ours) == set(expected)
    for name, array in expected.items():
        assert same_bits(ours[name], array), name
    assert np.array_equal(peer_logits(load_peer(dst), PROMPT),
                          peer_logits(load_peer(sources["int8-peer"]), PROMPT))


@pytest.mark.parametrize("kind", ["F32", "BF16", "F16", "Q8_0"])
def test_gguf_to_hf(sources, tmp_path, kind):
    """Matrices: the GGUF's values (F32, BF16 and F16 bits as stored; Q8_0 as the gguf package
    dequantizes it). Norms: the converter's 1 + w undone, so that transformers' float32 1 + w is
    the source checkpoint's bit for bit. transformers on the directory equals transformers on
    the source checkpoint (F32, BF16) or minigemma on the GGUF (F16, Q8_0)."""
    path, dst = sources[f"gguf-{kind}"], str(tmp_path / "out")
    lines = run(path, dst)
    source = read_safetensors(sources["hf-bf16" if kind == "BF16" else "hf-f32"])
    ours = read_safetensors(dst)
    assert set(ours) == set(source)
    for name, array in source.items():
        if is_norm(name):
            assert ours[name].dtype == np.float32
            assert np.array_equal(bits(one_plus(ours[name])), bits(one_plus(array))), name
        elif kind == "Q8_0":
            assert same_bits(ours[name], q8_0_values(array)), name
        elif kind == "F16":
            assert same_bits(ours[name], torch.from_numpy(array).half().numpy()), name
        else:
            assert same_bits(ours[name], array), name
    if kind == "Q8_0":
        assert any("GGUF Q8_0 -> F32 (dequantized)" in line for line in lines)
    peer = peer_logits(load_peer(dst), PROMPT)
    if kind in ("F32", "BF16"):
        reference = load_peer(sources["hf-bf16" if kind == "BF16" else "hf-f32"])
        assert np.array_equal(peer, peer_logits(reference, PROMPT))
    else:
        assert rel_diff(minigemma.load(path).forward(PROMPT), peer) <= RTOL
    # The tokenizer.model rebuilt from the GGUF vocabulary tokenizes as the original does
    text = "The capital of France is Paris.\n\n  <start_of_turn>user   naïve"
    assert (minigemma.Tokenizer(os.path.join(dst, "tokenizer.model")).encode(text)
            == minigemma.Tokenizer(TOKENIZER).encode(text))


def q8_0_values(array):
    """The float32 values of a float32 matrix quantized to Q8_0 by the gguf package (as llama.cpp's
    converter quantizes it) and dequantized by it."""
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.dequantize(gguf.quants.quantize(array, q8_0), q8_0)


def test_hf_destination_without_a_tokenizer(sources, tmp_path):
    """A .ckpt with no tokenizer.model beside it: the directory has none, and says so."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(sources["ckpt-bf16"], bare / "model.ckpt")
    dst = str(tmp_path / "out")
    lines = run(str(bare / "model.ckpt"), dst, config=sources["config"])
    assert "tokenizer.model" not in listing(dst)
    assert any("no tokenizer found" in line for line in lines)
    # and --tokenizer supplies one
    run(str(bare / "model.ckpt"), str(tmp_path / "with"), config=sources["config"],
        tokenizer=TOKENIZER)
    assert "tokenizer.model" in listing(tmp_path / "with")


# ----------------------------------------------------------------------------------------------
# GGUF destination


@pytest.mark.parametrize("source, outtype, converter", [
    ("hf-f32", None, "gguf-F32"), ("hf-bf16", None, "gguf-BF16"),
    ("hf-f32", "f16", "gguf-F16"), ("hf-f32", "q8_0", "gguf-Q8_0")])
def test_gguf_equals_llama_cpp_converter(sources, tmp_path, source, outtype, converter):
    """Tensor names, types, dims and bytes, and every metadata key and type (the tokenizer's
    included), as llama.cpp's convert_hf_to_gguf.py writes them from the same directory."""
    dst = str(tmp_path / "out.gguf")
    run(sources[source], dst, outtype=outtype)
    assert gguf_tensors(dst) == gguf_tensors(sources[converter])
    ours, theirs = gguf_fields(dst), gguf_fields(sources[converter])
    assert comparable(ours) == comparable(theirs)
    assert ours["general.name"][1] == source
    assert ours["minigemma.conversion"][1].startswith("converted by minigemma")


def test_q8_0_falls_back_to_f16_as_the_converter_does(tmp_path):
    """The conformance pack's tiny-mqa (D = 48, F = 96): matrices whose rows are not whole Q8_0
    blocks of 32 weights are written F16, the others Q8_0, as by llama.cpp's converter."""
    src = os.path.dirname(TOKENIZER)
    theirs = convert_hf_to_gguf(src, str(tmp_path / "theirs.gguf"), "q8_0")
    ours = str(tmp_path / "ours.gguf")
    lines = run(src, ours, outtype="q8_0")
    assert gguf_tensors(ours) == gguf_tensors(theirs)
    assert comparable(gguf_fields(ours)) == comparable(gguf_fields(theirs))
    assert {kind for kind, _, _ in gguf_tensors(ours).values()} == {"Q8_0", "F16", "F32"}
    assert any("not whole Q8_0 blocks of 32: F16" in line for line in lines)


def test_f16_source_norms_are_transformers_one_plus_w(sources, tmp_path):
    """A float16 checkpoint: matrices F16 as stored; norms float32(1 + w), the value transformers
    multiplies by. (llama.cpp's converter adds 1 in float16 here, which rounds.)"""
    dst = str(tmp_path / "out.gguf")
    run(sources["hf-f16"], dst)
    source = read_safetensors(sources["hf-f16"])
    _, tensors = gguf_reader.read(dst)
    stored = {t.name: t for t in gguf.GGUFReader(dst).tensors}
    for name, array in source.items():
        if is_norm(name):
            assert np.array_equal(bits(one_plus(tensors[name])), bits(one_plus(array))), name
        else:
            assert same_bits(tensors[name], array), name
    assert {t.tensor_type.name for t in stored.values()} == {"F16", "F32"}


@pytest.mark.parametrize("source", ["hf-f32", "ckpt-int8", "gguf-Q8_0"])
def test_gguf_destination_runs_in_llama_cpp_with_minigemmas_greedy_tokens(sources, tmp_path,
                                                                          source):
    config = sources["config"] if source.startswith("ckpt") else None
    dst = str(tmp_path / "out.gguf")
    run(sources[source], dst, config=config)
    ours = minigemma.load(sources[source], config=config)
    logits = ours.forward(PROMPT)
    expected = minigemma_greedy(ours, PROMPT, NEW_TOKENS)
    llama = llama_cpp_peer.run(dst, {"p": PROMPT.tolist()}, NEW_TOKENS, kv_cache="f32",
                               threads=1)["p"]
    assert np.abs(llama["logits"] - logits).max() <= LLAMA_ATOL
    assert llama["greedy"].tolist() == expected


@pytest.mark.parametrize("source", ["hf-f32", "hf-bf16", "ckpt-bf16", "ckpt-int8", "gguf-Q8_0"])
def test_gguf_destination_loads_back_with_the_sources_values(sources, tmp_path, source):
    """minigemma on the GGUF: matrices bit for bit the source's (int8 and Q8_0: their float32
    dequantized values, stored F32), norms with the source's float32 1 + w, and so the same
    logits (bit for bit where the stored types are the same)."""
    config = sources["config"] if source.startswith("ckpt") else None
    dst = str(tmp_path / "out.gguf")
    lines = run(sources[source], dst, config=config)
    before, after = minigemma.load(sources[source], config=config), minigemma.load(dst)
    assert before.config == after.config
    quantized = source in ("ckpt-int8", "gguf-Q8_0")
    for name, w in before.weights.items():
        if is_norm(name):
            assert np.array_equal(bits(one_plus(after.weights[name])), bits(one_plus(w))), name
        elif quantized:
            assert same_bits(np.asarray(after.weights[name]), w.dequantize()), name
        else:
            assert same_bits(np.asarray(after.weights[name]), np.asarray(w)), name
    if quantized:
        note = gguf_fields(dst)["minigemma.conversion"][1]
        assert "-> F32 (dequantized)" in note
        assert any("-> F32 (dequantized)" in line for line in lines)
        assert rel_diff(after.forward(PROMPT), before.forward(PROMPT)) <= 1e-6
    else:
        assert np.array_equal(after.forward(PROMPT), before.forward(PROMPT))


def test_gguf_to_gguf_keeps_tensors_and_vocabulary(sources, tmp_path):
    """The converter's BF16 file through minigemma: the same tensors and metadata, its tokenizer
    fields copied (not rebuilt)."""
    dst = str(tmp_path / "out.gguf")
    run(sources["gguf-BF16"], dst)
    assert gguf_tensors(dst) == gguf_tensors(sources["gguf-BF16"])
    assert comparable(gguf_fields(dst)) == comparable(gguf_fields(sources["gguf-BF16"]))


def test_orbax_to_hf_and_gguf(sources, tmp_path):
    """Kaggle's Flax layout (the Orbax checkpoint in 2b/, tokenizer.model beside it), written by
    Orbax in .venv-flax (test_flax.py's helpers): the Hugging Face directory holds the bfloat16
    checkpoint's bits, and the GGUF is llama.cpp's converter's file of that checkpoint."""
    import test_flax  # skips this test, saying why, when .venv-flax does not exist

    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    tree = test_flax.flax_tree(test_flax.hf_tensors(sources["hf-bf16"]), CONFIG)
    test_flax.orbax_save(tree, str(kaggle / "2b"), "bfloat16")
    shutil.copy(TOKENIZER, kaggle / "tokenizer.model")
    run(str(kaggle), str(tmp_path / "hf"))
    ours, theirs = read_safetensors(str(tmp_path / "hf")), read_safetensors(sources["hf-bf16"])
    assert set(ours) == set(theirs)
    for name, array in theirs.items():
        assert same_bits(ours[name], array), name
    assert "tokenizer.model" in listing(tmp_path / "hf")
    run(str(kaggle), str(tmp_path / "out.gguf"))
    assert gguf_tensors(str(tmp_path / "out.gguf")) == gguf_tensors(sources["gguf-BF16"])
    assert (comparable(gguf_fields(str(tmp_path / "out.gguf")))
            == comparable(gguf_fields(sources["gguf-BF16"])))


# ----------------------------------------------------------------------------------------------
# Gemma 2 and 3: to a Hugging Face directory (GGUF is written for Gemma 1 only)


@pytest.mark.parametrize("name", list(TINY_V2))
def test_gemma2_and_3_to_hf(tmp_path, name):
    """test_gemma3.py's tiny Gemma 2 and 3 (sliding windows, soft-caps, QK-norm, scaled RoPE),
    saved as bfloat16: the same bits and config, the same transformers logits."""
    cls, config_cls, kwargs, embed_std, qk_gain = TINY_V2[name]
    src, dst = str(tmp_path / "src"), str(tmp_path / "out")
    model = randomize(cls(config_cls(**kwargs)).eval(), 5, embed_std, qk_gain)
    model.to(torch.bfloat16).save_pretrained(src)
    run(src, dst, max_shard_size=SHARD)
    ours, theirs = read_safetensors(dst), read_safetensors(src)
    assert set(ours) == set(theirs)
    for key, array in theirs.items():
        assert same_bits(ours[key], array), key
    with open(os.path.join(dst, "config.json")) as a, open(os.path.join(src, "config.json")) as b:
        assert config_from_hf(json.load(a)) == config_from_hf(json.load(b))
    ids = prompt(20)
    assert np.array_equal(peer_logits(load_peer_v2(name, dst), ids),
                          peer_logits(load_peer_v2(name, src), ids))
    raises(lambda: convert(src, str(tmp_path / "out.gguf")), ConvertError, src,
           "GGUF files of Gemma 1 only")
    assert listing(tmp_path) == ["out", "src"]


def test_gemma3_multimodal_to_hf_is_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint becomes a Gemma3ForCausalLM directory: the
    vision tower is left out (and the progress says so); transformers' text logits on it are
    its logits on the source, bit for bit."""
    config = Gemma3Config(
        text_config=dict(TINY_V2["gemma3"][2], num_hidden_layers=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=509, eoi_token_index=510, image_token_index=511)
    src, dst = str(tmp_path / "src"), str(tmp_path / "out")
    randomize(Gemma3ForConditionalGeneration(config).eval(), 7, 0.1, 1.0).save_pretrained(src)
    lines = run(src, dst)
    assert any("vision tower" in line for line in lines)
    with open(os.path.join(dst, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Gemma3ForCausalLM"]
    ids = prompt(20) % 500
    ids[0] = 2
    theirs = peer_logits(load_peer(src, Gemma3ForConditionalGeneration), ids)
    ours = peer_logits(load_peer(dst, Gemma3ForCausalLM), ids)
    assert np.array_equal(ours, theirs)


# ----------------------------------------------------------------------------------------------
# All or nothing


class Injected(Exception):
    pass


def fail_at(text, error):
    """A progress callback raising `error` at the first line containing `text`."""
    def progress(line):
        if text in line:
            raise error
    return progress


@pytest.mark.parametrize("error", [Injected("disk full"), KeyboardInterrupt()],
                         ids=["failure", "ctrl-c"])
@pytest.mark.parametrize("dst_name", ["out", "out.gguf"])
def test_interrupted_write_leaves_nothing(sources, tmp_path, dst_name, error):
    before = listing(tmp_path)
    with pytest.raises(type(error)):
        convert(sources["hf-f32"], str(tmp_path / dst_name), max_shard_size=SHARD,
                progress=fail_at("[2/4] layer 0", error))
    assert listing(tmp_path) == before


@pytest.mark.parametrize("dst_name", ["out", "out.gguf"])
def test_sigterm_mid_write_leaves_nothing(sources, tmp_path, dst_name):
    """SIGTERM unwinds as the CLI arranges (SystemExit from the handler), mid-write: the signal
    is sent by the process to itself from the progress callback, so it lands at a known step."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from minigemma.convert import convert
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        def progress(line):
            if "[2/4] layer 0" in line:
                os.kill(os.getpid(), signal.SIGTERM)
        convert({sources["hf-f32"]!r}, {str(tmp_path / dst_name)!r}, max_shard_size={SHARD},
                progress=progress)
        print("not interrupted")
    """)
    before = listing(tmp_path)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "not interrupted" not in done.stdout
    assert listing(tmp_path) == before


@pytest.mark.parametrize("dst_name", ["out", "out.gguf"])
def test_existing_destination_is_kept_unless_force(sources, tmp_path, dst_name):
    dst = tmp_path / dst_name
    if dst_name == "out":
        dst.mkdir()
        (dst / "mine.txt").write_text("keep me")
        original = lambda: (dst / "mine.txt").read_text()
    else:
        dst.write_bytes(b"keep me")
        original = lambda: dst.read_text()
    with pytest.raises(FileExistsError, match=str(dst)):
        convert(sources["hf-bf16"], str(dst))
    assert original() == "keep me"
    # --force with a failure mid-write: the old destination is still there, untouched
    with pytest.raises(Injected):
        convert(sources["hf-bf16"], str(dst), force=True, progress=fail_at("[3/4]", Injected()))
    assert original() == "keep me"
    assert listing(tmp_path) == [dst_name]
    convert(sources["hf-bf16"], str(dst), force=True)
    assert minigemma.load(str(dst)).config == minigemma.load(sources["hf-bf16"]).config
    if dst_name == "out":
        assert "mine.txt" not in listing(dst)


def test_force_replaces_only_the_same_kind_and_never_the_source(sources, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is a file"):
        convert(sources["hf-bf16"], str(tmp_path / "file"), to="hf", force=True)
    copy = tmp_path / "copy"
    shutil.copytree(sources["hf-bf16"], copy)
    with pytest.raises(ConvertError, match="would delete the source"):
        convert(str(copy), str(copy), force=True)
    with pytest.raises(ConvertError, match="would delete the source"):
        convert(str(copy / "model.safetensors"), str(copy), force=True)
    assert listing(copy) == listing(sources["hf-bf16"])


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error naming the path or argument, and nothing written


def raises(call, error, *fragments):
    with pytest.raises(error) as e:
        call()
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in {str(e.value)!r}"


def test_bad_sources(sources, tmp_path):
    dst = str(tmp_path / "out")
    missing = str(tmp_path / "missing")
    raises(lambda: convert(missing, dst), FileNotFoundError, missing)
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8).tobytes())
    raises(lambda: convert(str(noise), dst), ValueError, str(noise))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(sources["gguf-F32"], "rb").read()[:5000])
    raises(lambda: convert(str(cut), dst), ValueError, str(cut), "truncated")
    empty = tmp_path / "empty"
    empty.mkdir()
    raises(lambda: convert(str(empty), dst), ValueError, str(empty), "no checkpoint found")
    assert listing(tmp_path) == sorted(["noise.gguf", "cut.gguf", "empty"])


def test_bad_destinations(sources, tmp_path):
    src = sources["hf-bf16"]
    raises(lambda: convert(src, str(tmp_path / "out.ckpt")), ConvertError, "out.ckpt",
           "unknown extension '.ckpt'", "--to")
    nowhere = tmp_path / "no" / "such"
    raises(lambda: convert(src, str(nowhere / "out.gguf")), FileNotFoundError,
           str(nowhere / "out.gguf"), f"{nowhere} does not exist")
    raises(lambda: convert(src, str(tmp_path / "out"), outtype="q8_0"), ConvertError,
           "outtype 'q8_0'", "GGUF destination")
    raises(lambda: convert(src, str(tmp_path / "out.gguf"), outtype="q4_0"), ConvertError,
           "outtype 'q4_0'", "f32, f16, bf16, q8_0")
    raises(lambda: convert(src, str(tmp_path / "out"), to="onnx"), ConvertError, "'onnx'")
    assert listing(tmp_path) == []
    # A directory named like a version is a directory; --to gguf names a file whatever its name
    convert(src, str(tmp_path / "gemma-1.1-tiny"))
    convert(src, str(tmp_path / "tiny.bin"), to="gguf")
    assert minigemma.load(str(tmp_path / "tiny.bin")).config == minigemma.load(src).config


def test_bad_tokenizers(sources, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(sources["ckpt-bf16"], bare / "model.ckpt")
    ckpt, dst = str(bare / "model.ckpt"), str(tmp_path / "out.gguf")
    raises(lambda: convert(ckpt, dst, config=sources["config"]), FileNotFoundError,
           str(bare / "tokenizer.model"), "--tokenizer")
    missing = str(tmp_path / "nope.model")
    raises(lambda: convert(ckpt, dst, config=sources["config"], tokenizer=missing),
           FileNotFoundError, missing)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    raises(lambda: convert(ckpt, dst, config=sources["config"], tokenizer=str(junk)),
           ConvertError, str(junk), "SentencePiece")
    small = save_checkpoint(random_gemma(dict(CONFIG, vocab_size=256)), tmp_path / "small")
    raises(lambda: convert(str(small), dst, tokenizer=TOKENIZER), ConvertError, TOKENIZER,
           "512 pieces, more than the 256 rows")
    assert listing(tmp_path) == sorted(["bare", "junk.model", "small"])
    # a GGUF holding no vocabulary (the gguf package's writer, as test_gguf.py writes it)
    vocabless = write_gguf(str(tmp_path / "vocabless.gguf"), gguf_good_tensors(), GGUF_CONFIG)
    raises(lambda: convert(vocabless, dst), FileNotFoundError, vocabless,
           "holds no vocabulary", "--tokenizer")
    lines = run(vocabless, str(tmp_path / "hf"))  # a directory without a tokenizer is fine
    assert "tokenizer.model" not in listing(tmp_path / "hf")
    assert any("no tokenizer found" in line for line in lines)
