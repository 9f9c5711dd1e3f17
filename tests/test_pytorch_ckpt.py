"""gemma_pytorch / Kaggle `.ckpt` checkpoints, read without torch, against transformers.

The checkpoints are written by torch's own `torch.save` in gemma_pytorch's layout (see
gemma/model.py in https://github.com/google/gemma_pytorch): the state dict of its
GemmaForCausalLM, wrapped in {"model_state_dict": ...}, with the `freqs_cis` buffer first,
`embedder.weight`, and q, k, v fused into `self_attn.qkv_proj.weight` rows [q | k | v]. The int8
variant stores every Linear and Embedding weight as int8 with a float32 `weight_scaler` per output
row, as gemma_pytorch's quantized checkpoints do. The weights are those of a seeded random
transformers GemmaForCausalLM; the peer is that transformers model carrying the same weights
(for int8: the dequantized int8 * scale).
"""

import builtins
import collections
import copy
import io
import json
import os
import pickle
import shlex
import subprocess
import zipfile

import numpy as np
import pytest
import torch

import minigemma
from helpers import rel_diff
from minigemma.config import from_hf_config
from minigemma.formats import pytorch, read_checkpoint
from minigemma.formats.pytorch import TorchCheckpointError
from minigemma.quant import Int8Rows
from hf_peer import TINY, load_peer, peer_logits, random_gemma, save_checkpoint

RTOL = 1e-5  # max |dlogit| / max |logit|
PROMPT = np.array([2, 17, 300, 45, 8, 411, 99, 3, 250, 7])
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ----------------------------------------------------------------------------------------------
# Writing gemma_pytorch checkpoints from a transformers model


def gemma_pytorch_state(model):
    """The state dict gemma_pytorch's GemmaForCausalLM would hold for these weights (torch)."""
    c = model.config
    hf = model.state_dict()
    # gemma_pytorch's RoPE buffer: cis(position * 10000^(-2i/H)) for 2 * max positions, complex64
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim)
    angles = torch.outer(torch.arange(2 * c.max_position_embeddings).float(), inv_freq)
    state = collections.OrderedDict(freqs_cis=torch.polar(torch.ones_like(angles), angles))
    state["embedder.weight"] = hf["model.embed_tokens.weight"]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.qkv_proj.weight"] = torch.cat(
            [hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        state[p + "self_attn.o_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            state[p + name + ".weight"] = hf[p + name + ".weight"]
        for name in ("input_layernorm", "post_attention_layernorm"):
            state[p + name + ".weight"] = hf[p + name + ".weight"]
    state["model.norm.weight"] = hf["model.norm.weight"]
    return state


def quantize_rows(w):
    """(int8 [rows, cols], float32 scale [rows]): symmetric per-row int8, w ~ int8 * scale."""
    scale = w.abs().amax(dim=1) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.float()


def quantize_state(state):
    """gemma_pytorch's quant layout: every 2-D weight -> int8 `weight` + float32 `weight_scaler`."""
    out = collections.OrderedDict()
    for name, w in state.items():
        if w.ndim == 2 and name != "freqs_cis":
            out[name], out[name + "_scaler"] = quantize_rows(w)
        else:
            out[name] = w
    return out


def dequantized_peer(model, quantized):
    """A copy of the transformers model whose Linear/Embedding weights are int8 * scale."""
    peer = copy.deepcopy(model)
    deq = lambda name: quantized[name].float() * quantized[name + "_scaler"][:, None]
    c = model.config
    N, K, H = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    with torch.no_grad():
        peer.model.embed_tokens.weight.copy_(deq("embedder.weight"))
        for i, layer in enumerate(peer.model.layers):
            p = f"model.layers.{i}."
            qkv = deq(p + "self_attn.qkv_proj.weight")
            layer.self_attn.q_proj.weight.copy_(qkv[:N * H])
            layer.self_attn.k_proj.weight.copy_(qkv[N * H:(N + K) * H])
            layer.self_attn.v_proj.weight.copy_(qkv[(N + K) * H:])
            layer.self_attn.o_proj.weight.copy_(deq(p + "self_attn.o_proj.weight"))
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(layer.mlp, name).weight.copy_(deq(p + f"mlp.{name}.weight"))
    return peer


def save_ckpt(state, path):
    """torch.save as gemma_pytorch and Kaggle ship it: {"model_state_dict": state dict}."""
    torch.save({"model_state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """{(layout, storage): (ckpt path, config.json path, peer directory)} for layouts mqa (K = 1)
    and mha (K = N), N*H != D in both; storage f32, bf16 or int8."""
    out = {}
    for seed, layout in enumerate(("mqa", "mha")):
        model = random_gemma(TINY[layout], seed=20 + seed)
        d = tmp_path_factory.mktemp(layout)
        config_json = d / "config.json"
        model.config.to_json_file(config_json)
        state = gemma_pytorch_state(model)
        quantized = quantize_state(state)
        peer_dir = save_checkpoint(dequantized_peer(model, quantized), d / "peer-int8")
        out[layout, "int8"] = (save_ckpt(quantized, d / "int8.ckpt"), config_json, peer_dir)
        # last: saving as bfloat16 leaves the model's own weights rounded to bfloat16
        for storage, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            peer_dir = save_checkpoint(model, d / f"peer-{storage}", dtype)
            typed = collections.OrderedDict(
                (k, v if k == "freqs_cis" else v.to(dtype)) for k, v in state.items())
            out[layout, storage] = (save_ckpt(typed, d / f"{storage}.ckpt"), config_json, peer_dir)
    return out




# ----------------------------------------------------------------------------------------------
# Logits against transformers


@pytest.mark.parametrize("storage", ["f32", "bf16", "int8"])
@pytest.mark.parametrize("layout", ["mqa", "mha"])
def test_logits_match_transformers(cases, layout, storage):
    ckpt, config_json, peer_dir = cases[layout, storage]
    # config= as a config.json path for one layout, as a GemmaConfig for the other
    config = config_json if layout == "mqa" else from_hf_config(json.loads(config_json.read_text()))
    model = minigemma.load(ckpt, config=config)
    ref = peer_logits(load_peer(peer_dir), PROMPT)
    assert rel_diff(model.forward(PROMPT), ref) <= RTOL
    # The last token again, decoded through the KV cache (one-token path)
    cache = model.new_cache(len(PROMPT))
    model.forward(PROMPT[:-1], cache)
    assert rel_diff(model.forward(PROMPT[-1:], cache), ref[-1:]) <= RTOL


@pytest.mark.parametrize("layout", ["mqa", "mha"])
def test_int8_weights_stay_int8(cases, layout):
    ckpt, config_json, _ = cases[layout, "int8"]
    model = minigemma.load(ckpt, config=config_json)
    c = model.config
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{n}.weight"
                                             for i in range(c.n_layers) for n in LINEARS]
    for name in names:
        w = model.weights[name]
        assert isinstance(w, Int8Rows), name
        assert w.weight.dtype == np.int8 and w.scaler.dtype == np.float32, name
        assert not w.weight.flags.owndata and not w.weight.flags.writeable, name  # a file view
        assert w.nbytes == w.shape[0] * w.shape[1] + 4 * w.shape[0], name
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert model.weights[name].dtype == np.float32
    description = read_checkpoint(ckpt, config=config_json)[2]
    assert description == (f"gemma_pytorch checkpoint {ckpt} (int8 weights with per-row scales); "
                           f"config from {config_json}")


@pytest.mark.parametrize("storage, dtype", [("f32", np.float32), ("bf16", np.uint16)])
def test_float_weights_are_views_in_their_stored_dtype(cases, storage, dtype):
    ckpt, config_json, _ = cases["mha", storage]
    model = minigemma.load(ckpt, config=config_json)
    for name, w in model.weights.items():
        assert w.dtype == dtype and not w.flags.owndata and not w.flags.writeable, name


def test_views_with_offsets_and_strides(cases, tmp_path):
    """Tensors saved as views keep torch's storage offset and strides: a qkv_proj that is a row
    range of a bigger tensor, an o_proj stored column-major, a norm with stride 2."""
    ckpt, config_json, peer_dir = cases["mha", "f32"]
    state = torch.load(ckpt, weights_only=True)["model_state_dict"]
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    state[qkv] = torch.cat([torch.randn(5, state[qkv].shape[1]), state[qkv]])[5:]
    o = "model.layers.1.self_attn.o_proj.weight"
    state[o] = state[o].t().contiguous().t()
    norm = "model.layers.1.input_layernorm.weight"
    state[norm] = torch.stack([state[norm], torch.randn_like(state[norm])], dim=1)[:, 0]
    assert state[qkv].storage_offset() == 5 * state[qkv].shape[1]
    assert state[o].stride() == (1, state[o].shape[0]) and state[norm].stride() == (2,)
    path = save_ckpt(state, tmp_path / "views.ckpt")
    model = minigemma.load(path, config=config_json)
    ref = peer_logits(load_peer(peer_dir), PROMPT)
    assert rel_diff(model.forward(PROMPT), ref) <= RTOL


def test_bare_state_dict_without_wrapper(cases, tmp_path):
    ckpt, config_json, peer_dir = cases["mqa", "bf16"]
    state = torch.load(ckpt, weights_only=True)["model_state_dict"]
    torch.save(state, tmp_path / "bare.ckpt")
    model = minigemma.load(tmp_path / "bare.ckpt", config=config_json)
    ref = peer_logits(load_peer(peer_dir), PROMPT)
    assert rel_diff(model.forward(PROMPT), ref) <= RTOL


# ----------------------------------------------------------------------------------------------
# Malicious pickles: refused before anything runs. Each payload creates a file when unpickled by
# torch.load(weights_only=False), which the test checks too, so the refusal is not vacuous.


class SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


class ExecPayload(SystemPayload):
    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


class PopenPayload(SystemPayload):
    def __reduce__(self):
        return subprocess.Popen, (["touch", self.marker],)


class NestedPayload(SystemPayload):
    """An allowed callable (OrderedDict) whose argument is itself a payload."""

    def __reduce__(self):
        return collections.OrderedDict, ([("inner", SystemPayload(self.marker))],)


@pytest.mark.parametrize("payload, global_name", [
    (SystemPayload, f"{os.system.__module__}.system"),
    (ExecPayload, "builtins.exec"),
    (PopenPayload, "subprocess.Popen"),
    (NestedPayload, f"{os.system.__module__}.system"),
])
def test_malicious_pickle_is_refused_and_never_run(cases, tmp_path, payload, global_name):
    ckpt, config_json, _ = cases["mqa", "f32"]
    state = torch.load(ckpt, weights_only=True)["model_state_dict"]
    marker = tmp_path / "pwned"
    state["model.layers.0.self_attn.o_proj.weight"] = payload(marker)
    path = save_ckpt(state, tmp_path / "evil.ckpt")
    with pytest.raises(TorchCheckpointError) as e:
        minigemma.load(path, config=config_json)
    assert f"{path}: data.pkl asks for the global {global_name}" in str(e.value)
    assert not marker.exists()
    # The same file does run its payload under an unrestricted unpickler
    loaded = torch.load(path, weights_only=False)["model_state_dict"]
    value = loaded["model.layers.0.self_attn.o_proj.weight"]
    if isinstance(value, subprocess.Popen):
        value.wait()
    assert marker.exists()


# ----------------------------------------------------------------------------------------------
# Broken files and state dicts


def raises(call, *fragments, error=TorchCheckpointError):
    with pytest.raises(error) as e:
        call()
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in {str(e.value)!r}"


@pytest.fixture
def f32_state(cases):
    ckpt, config_json, _ = cases["mqa", "f32"]
    return torch.load(ckpt, weights_only=True)["model_state_dict"], config_json


@pytest.mark.parametrize("keep", [10, "half", -22])
def test_truncated_zip(cases, tmp_path, keep):
    ckpt, config_json, _ = cases["mqa", "f32"]
    raw = ckpt.read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(raw[:{"half": len(raw) // 2}.get(keep, keep)])
    raises(lambda: minigemma.load(path, config=config_json), f"{path}: not a readable zip archive",
           "truncated")


def test_compressed_storage_entry(cases, tmp_path):
    ckpt, config_json, _ = cases["mqa", "f32"]
    path = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(ckpt) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    raises(lambda: minigemma.load(path, config=config_json),
           f"{path}: tensor embedder.weight: storage", "is compressed")


def test_missing_tensor(f32_state, tmp_path):
    state, config_json = f32_state
    del state["model.layers.1.mlp.up_proj.weight"]
    path = save_ckpt(state, tmp_path / "missing.ckpt")
    raises(lambda: minigemma.load(path, config=config_json),
           f"{path}: tensor model.layers.1.mlp.up_proj.weight is missing (expected shape (128, 64))")


def test_misshapen_tensor(f32_state, tmp_path):
    state, config_json = f32_state
    qkv = "model.layers.0.self_attn.qkv_proj.weight"  # (4 + 2*1) * 32 = 192 rows
    state[qkv] = state[qkv][:160]
    path = save_ckpt(state, tmp_path / "misshapen.ckpt")
    raises(lambda: minigemma.load(path, config=config_json),
           f"{path}: tensor {qkv} has shape (160, 64), expected (192, 64) "
           f"(config from {config_json})")


def test_unexpected_tensor(f32_state, tmp_path):
    state, config_json = f32_state
    state["model.layers.0.pre_feedforward_layernorm.weight"] = torch.zeros(64)  # a Gemma 2 norm
    path = save_ckpt(state, tmp_path / "gemma2.ckpt")
    raises(lambda: minigemma.load(path, config=config_json),
           f"{path}: unexpected tensor model.layers.0.pre_feedforward_layernorm.weight")


def test_int8_weight_without_scaler(cases, tmp_path):
    ckpt, config_json, _ = cases["mqa", "int8"]
    state = torch.load(ckpt, weights_only=True)["model_state_dict"]
    del state["model.layers.1.mlp.down_proj.weight_scaler"]
    path = save_ckpt(state, tmp_path / "noscale.ckpt")
    raises(lambda: minigemma.load(path, config=config_json),
           f"{path}: tensor model.layers.1.mlp.down_proj.weight is int8 but "
           f"model.layers.1.mlp.down_proj.weight_scaler is missing")


def test_scaler_of_the_wrong_length(cases, tmp_path):
    ckpt, config_json, _ = cases["mqa", "int8"]
    state = torch.load(ckpt, weights_only=True)["model_state_dict"]
    state["embedder.weight_scaler"] = state["embedder.weight_scaler"][:100]
    path = save_ckpt(state, tmp_path / "shortscale.ckpt")
    raises(lambda: minigemma.load(path, config=config_json),
           f"{path}: tensor embedder.weight_scaler has shape (100,) dtype float32, expected (512,)")


def test_unsupported_storage_type(f32_state, tmp_path):
    state, config_json = f32_state
    state["model.norm.weight"] = state["model.norm.weight"].double()
    path = save_ckpt(state, tmp_path / "double.ckpt")
    raises(lambda: minigemma.load(path, config=config_json),
           f"{path}: data.pkl holds a torch.DoubleStorage; minigemma reads float32, float16, "
           f"bfloat16 and int8")


def test_int8_norm_is_refused(f32_state, tmp_path):
    state, config_json = f32_state
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int8)
    path = save_ckpt(state, tmp_path / "int8norm.ckpt")
    raises(lambda: minigemma.load(path, config=config_json),
           f"{path}: tensor model.norm.weight has dtype int8; minigemma reads float32, float16, "
           f"bfloat16")


@pytest.mark.parametrize("saved, found", [([1, 2, 3], "list"),
                                          ({"model_state_dict": {"embedder.weight": 3}}, "int")])
def test_not_a_state_dict_of_tensors(cases, tmp_path, saved, found):
    _, config_json, _ = cases["mqa", "f32"]
    path = tmp_path / "odd.ckpt"
    torch.save(saved, path)
    raises(lambda: minigemma.load(path, config=config_json), f"{path}:", found)


# ----------------------------------------------------------------------------------------------
# Forged data.pkl: the calls torch.save writes, with arguments it never would


class Storage:
    """Pickled as torch pickles a storage: the persistent id ('storage', type, key, 'cpu', numel)."""

    def __init__(self, storage_type=torch.FloatStorage, key="0", numel=12):
        self.pid = ("storage", storage_type, key, "cpu", numel)


class Tensor:
    """Pickled as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...), plus a
    BUILD of `state` afterwards when given."""

    def __init__(self, storage, offset, size, stride, state=None):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())
        self.state = state

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args) + ((self.state,) if self.state else ())


class StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, Storage) else None


def forge_ckpt(path, tensor):
    """A torch.save archive of {"model_state_dict": {"embedder.weight": tensor}} whose data/0
    holds the float32 values 0..11."""
    torch.save({"model_state_dict": {"embedder.weight": torch.arange(12.0)}}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    buffer = io.BytesIO()
    StoragePickler(buffer, protocol=2).dump({"model_state_dict": {"embedder.weight": tensor}})
    pkl = next(name for name in entries if name.endswith("/data.pkl"))
    entries[pkl] = buffer.getvalue()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, raw in entries.items():
            archive.writestr(name, raw)
    return path


def test_forged_pickle_that_is_valid_reads_as_torch_reads_it(tmp_path):
    """A transposed 3x4 view at offset 0 of the 12-element storage: ours equals torch.load."""
    path = forge_ckpt(tmp_path / "ok.ckpt", Tensor(Storage(), 0, (4, 3), (1, 4)))
    ours = pytorch.read_state_dict(path)["embedder.weight"]
    theirs = torch.load(path, weights_only=True)["model_state_dict"]["embedder.weight"]
    np.testing.assert_array_equal(ours, theirs.numpy())


@pytest.mark.parametrize("tensor, fragments", [
    (Tensor(Storage(), 2, (4, 3), (3, 1)),
     ["tensor embedder.weight of size (4, 3), stride (3, 1), offset 2 reaches past its storage "
      "of 12 elements"]),
    (Tensor(Storage(), 0, (3,), (-1,)), ["data.pkl rebuilds a tensor from malformed arguments"]),
    (Tensor(Storage(numel=13), 0, (3,), (1,)),
     ["tensor embedder.weight: storage", "holds 48 bytes, expected 52 (13 x torch.FloatStorage)"]),
    (Tensor(Storage(key="7"), 0, (3,), (1,)),
     ["tensor embedder.weight: its storage", "data/7 is not in the archive"]),
    (Tensor(Storage(storage_type="torch.FloatStorage"), 0, (3,), (1,)),
     ["data.pkl has a malformed storage reference"]),
    (Tensor(Storage(), 0, (3,), (1,), state={"offset": 10 ** 12}),  # BUILD mutating the tensor
     ["data.pkl is not a torch.save pickle of tensors"]),
])
def test_forged_pickles_are_refused(tmp_path, tensor, fragments):
    path = forge_ckpt(tmp_path / "forged.ckpt", tensor)
    raises(lambda: pytorch.read_state_dict(path), f"{path}: ", *fragments)


def test_forged_stride_of_a_length_one_axis_is_never_used(tmp_path):
    path = forge_ckpt(tmp_path / "forged.ckpt", Tensor(Storage(), 3, (1, 3), (10 ** 30, 1)))
    np.testing.assert_array_equal(pytorch.read_state_dict(path)["embedder.weight"], [[3, 4, 5]])
