"""Issue 12's matrix: every bad input gets one MinigemmaError naming the file, tensor or argument.

The errors form one hierarchy (minigemma/errors.py), each class also the built-in exception code
caught before (ValueError, FileNotFoundError, ...). The checkpoints here are a tiny seeded random
Gemma 1 written by the real tools of each format: the `safetensors` package (Hugging Face),
`torch.save` in gemma_pytorch's layout (.ckpt, float32 and int8 with per-row scales), and the
`gguf` package's writer with the metadata llama.cpp's converter writes. Each row damages one of
them the way a broken download or a wrong conversion would. (tests/test_bad_input.py holds the
safetensors reader's own cases; the pickle payloads live in tests/test_pytorch_ckpt.py.)
"""

import collections
import inspect
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch

import minigemma
import minigemma.errors as errors
from minigemma import golden
from minigemma.checkpoint import expected_shapes
from minigemma.config import GemmaConfig, gemma_7b
from minigemma.errors import MinigemmaError
from minigemma.model import Gemma
from minigemma.sampling import Chat, Sampler
from helpers import raises, write_gguf

gguf = pytest.importorskip("gguf")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TOKENIZER = os.path.join(ROOT, "examples", "tiny-gemma", "tokenizer.model")
# A tiny Gemma 1 (multi-query, N*H != D) over the tiny tokenizer's 512 pieces.
HF_CONFIG = dict(architectures=["GemmaForCausalLM"], model_type="gemma", vocab_size=512,
                 hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=32, intermediate_size=128,
                 max_position_embeddings=32, rope_theta=10000.0, rms_norm_eps=1e-6,
                 hidden_activation="gelu_pytorch_tanh", torch_dtype="float32")
CONFIG = minigemma.config.from_hf_config(HF_CONFIG)
UP = "model.layers.1.mlp.up_proj.weight"
PROMPT = [2, 17, 300, 45, 8]


# ----------------------------------------------------------------------------------------------
# The hierarchy


BUILT_IN = {"CheckpointError": ValueError, "CheckpointNotFoundError": FileNotFoundError,
            "ConfigError": ValueError, "ConfigNotFoundError": FileNotFoundError,
            "TokenizerError": ValueError, "TokenizerNotFoundError": FileNotFoundError,
            "GenerationError": ValueError, "ContextFullError": ValueError,
            "NonFiniteError": FloatingPointError, "GoldenError": ValueError,
            "GoldenNotFoundError": FileNotFoundError, "GoldenWriteError": OSError,
            "InsufficientMemoryError": MemoryError, "SafetensorsError": ValueError,
            "TorchCheckpointError": ValueError, "GGUFError": ValueError,
            "OrbaxCheckpointError": ValueError, "CheckpointFormatError": ValueError,
            "NonFiniteWeightsError": ValueError, "ConvertError": ValueError,
            "ConvertDestinationError": FileNotFoundError, "OutputExistsError": FileExistsError}


@pytest.mark.parametrize("name, built_in", BUILT_IN.items())
def test_every_error_is_a_minigemma_error_and_its_built_in(name, built_in):
    cls = getattr(minigemma, name)
    assert cls is getattr(errors, name) and name in minigemma.__all__
    assert issubclass(cls, MinigemmaError) and issubclass(cls, built_in)
    assert name in errors.__doc__  # the documented tree names every class
    assert str(cls("x: what was expected")) == "x: what was expected"


def test_the_documented_tree_is_the_class_tree():
    """Each class in the docstring's tree sits under its parent class, 4 columns a level."""
    classes = {name: cls for name, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, MinigemmaError)}
    assert set(classes) == set(BUILT_IN) | {"MinigemmaError"}
    lines = [line for line in errors.__doc__.splitlines()
             if line.lstrip(" │├└─").split(" ")[0] in classes]
    base = len(lines[0]) - len(lines[0].lstrip(" │├└─"))
    stack, parents = [], {}
    for line in lines:
        name = line.lstrip(" │├└─").split(" ")[0]
        depth = (len(line) - len(line.lstrip(" │├└─")) - base) // 4
        stack[depth:] = [name]
        parents[name] = stack[depth - 1] if depth else None
    assert set(parents) == set(classes)
    for name, parent in parents.items():
        if parent:
            assert classes[parent] in classes[name].__bases__, (name, parent)


def test_format_modules_raise_the_same_classes():
    from minigemma.formats import CheckpointFormatError, pytorch, safetensors
    assert safetensors.SafetensorsError is errors.SafetensorsError
    assert pytorch.TorchCheckpointError is errors.TorchCheckpointError
    assert CheckpointFormatError is errors.CheckpointFormatError


# ----------------------------------------------------------------------------------------------
# Checkpoints in every format: written by each format's own tool from the same random weights


def random_tensors(seed=0):
    """{Hugging Face name: float32 array} of the tiny model, every tensor seeded random."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * (0.5 if len(shape) == 1 else shape[1] ** -0.5)
                   ).astype(np.float32) for name, shape in expected_shapes(CONFIG).items()}


def write_hf(directory, tensors, config=HF_CONFIG):
    os.makedirs(directory, exist_ok=True)
    safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"),
                                metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def gemma_pytorch_state(tensors):
    """gemma_pytorch's state dict names and layout: q, k, v fused into qkv_proj rows [q | k | v]."""
    state = collections.OrderedDict()
    for name, w in tensors.items():
        if name == "model.embed_tokens.weight":
            state["embedder.weight"] = torch.from_numpy(w)
        elif ".self_attn.q_proj." in name:
            prefix = name.split("self_attn.")[0] + "self_attn."
            state[prefix + "qkv_proj.weight"] = torch.cat(
                [torch.from_numpy(tensors[prefix + f"{x}_proj.weight"]) for x in "qkv"])
        elif ".self_attn.k_proj." not in name and ".self_attn.v_proj." not in name:
            state[name] = torch.from_numpy(w)
    return state


def quantize(state):
    """gemma_pytorch's int8 layout: every matrix int8 with a float32 weight_scaler per row."""
    out = collections.OrderedDict()
    for name, w in state.items():
        if w.ndim == 2:
            scale = w.abs().amax(dim=1) / 127
            out[name] = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            out[name + "_scaler"] = scale
        else:
            out[name] = w
    return out


def write_ckpt(path, state):
    torch.save({"model_state_dict": state}, path)
    return str(path)


GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name):
    """llama.cpp's name of a tensor (convert_hf_to_gguf.py, gguf-py's tensor_mapping)."""
    special = {"model.embed_tokens.weight": "token_embd.weight",
               "model.norm.weight": "output_norm.weight"}
    if hf_name in special:
        return special[hf_name]
    _, _, i, module = hf_name.split(".", 3)
    return f"blk.{i}.{GGUF_LAYER[module.removesuffix('.weight')]}.weight"


def gguf_tensors(tensors, quantized=False):
    """{GGUF name: (array, ggml type)} as llama.cpp's converter stores them: norms as float32
    1 + w, matrices float32 or Q8_0 blocks."""
    f32, q8 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0
    out = {}
    for name, w in tensors.items():
        if w.ndim == 1:
            out[gguf_name(name)] = (w + np.float32(1), f32)
        elif quantized:
            out[gguf_name(name)] = (gguf.quants.quantize(w, q8), q8)
        else:
            out[gguf_name(name)] = (w, f32)
    return out


FORMATS = ["hf", "ckpt", "ckpt-int8", "gguf", "gguf-q8_0"]


def write_format(kind, tmp_path, tensors, config=HF_CONFIG):
    """(path to load, config= to pass) of `tensors` written in format `kind`."""
    if kind == "hf":
        return write_hf(tmp_path / "hf", tensors, config), None
    if kind.startswith("ckpt"):
        state = gemma_pytorch_state(tensors)
        state = quantize(state) if kind == "ckpt-int8" else state
        return write_ckpt(tmp_path / "model.ckpt", state), minigemma.config.from_hf_config(config)
    return write_gguf(tmp_path / "model.gguf", gguf_tensors(tensors, kind == "gguf-q8_0"),
                      config), None


def load(kind, tmp_path, tensors, config=HF_CONFIG, **options):
    path, given = write_format(kind, tmp_path, tensors, config)
    return minigemma.load(path, config=given, **options)


def stored_name(kind, hf_name):
    """How format `kind` names a Hugging Face tensor."""
    if kind == "hf":
        return hf_name
    if kind.startswith("gguf"):
        return gguf_name(hf_name)
    return "embedder.weight" if hf_name == "model.embed_tokens.weight" else hf_name


@pytest.mark.parametrize("kind", FORMATS)
def test_a_good_checkpoint_loads_in_every_format(kind, tmp_path):
    model = load(kind, tmp_path, random_tensors(), check_weights=True)
    assert model.forward(PROMPT).shape == (len(PROMPT), 512)


@pytest.mark.parametrize("kind", FORMATS)
def test_a_missing_tensor_is_named(kind, tmp_path):
    tensors = random_tensors()
    del tensors[UP]
    error = raises(lambda: load(kind, tmp_path, tensors), stored_name(kind, UP), "missing")
    assert str(tmp_path) in str(error)


@pytest.mark.parametrize("kind", FORMATS)
def test_an_extra_tensor_is_named(kind, tmp_path):
    tensors = {**random_tensors(), "model.layers.0.pre_feedforward_layernorm.weight":
               np.zeros(64, np.float32)}
    if kind.startswith("gguf"):  # llama.cpp would call it blk.0.ffn_pre_norm... any name will do
        path = write_gguf(tmp_path / "x.gguf", {**gguf_tensors(random_tensors()), "blk.0.extra.weight":
                                                (np.zeros(64, np.float32),
                                                 gguf.GGMLQuantizationType.F32)}, HF_CONFIG)
        raises(lambda: minigemma.load(path), path, "unexpected tensor blk.0.extra.weight")
        return
    raises(lambda: load(kind, tmp_path, tensors), str(tmp_path),
           "unexpected tensor model.layers.0.pre_feedforward_layernorm.weight")


@pytest.mark.parametrize("kind", FORMATS)
def test_a_misshapen_tensor_is_named(kind, tmp_path):
    tensors = random_tensors()
    tensors[UP] = tensors[UP][:100]
    raises(lambda: load(kind, tmp_path, tensors), str(tmp_path), stored_name(kind, UP),
           "(100, 64)", "(128, 64)")


def test_an_unsupported_dtype_is_named_in_every_format(tmp_path):
    tensors = random_tensors()
    hf = write_hf(tmp_path / "hf", {**tensors, UP: tensors[UP].astype(np.float64)})
    raises(lambda: minigemma.load(hf), UP, "dtype F64; minigemma reads BF16, F16, F32")
    state = gemma_pytorch_state(tensors)
    state[UP] = state[UP].double()
    ckpt = write_ckpt(tmp_path / "f64.ckpt", state)
    raises(lambda: minigemma.load(ckpt, config=CONFIG), ckpt, "torch.DoubleStorage")
    stored = gguf_tensors(tensors)
    stored[gguf_name(UP)] = (tensors[UP].astype(np.int32), gguf.GGMLQuantizationType.I32)
    path = write_gguf(tmp_path / "i32.gguf", stored, HF_CONFIG)
    raises(lambda: minigemma.load(path), path, gguf_name(UP), "I32")


# Every field of config.json that the tensors can contradict, and the tensor that says so.
CONFIG_FIELDS = [("vocab_size", 500, "model.embed_tokens.weight"),
                 ("hidden_size", 96, "model.embed_tokens.weight"),
                 ("num_hidden_layers", 3, "model.layers.2."),
                 ("num_hidden_layers", 1, "model.layers.1."),
                 ("num_attention_heads", 2, "self_attn.q_proj.weight"),
                 ("num_key_value_heads", 2, "self_attn.k_proj.weight"),
                 ("head_dim", 16, "self_attn.q_proj.weight"),
                 ("intermediate_size", 100, "mlp.gate_proj.weight")]


@pytest.mark.parametrize("field, value, culprit", CONFIG_FIELDS)
def test_a_config_that_disagrees_with_the_tensors_hf(field, value, culprit, tmp_path):
    path = write_hf(tmp_path / "hf", random_tensors(), {**HF_CONFIG, field: value})
    raises(lambda: minigemma.load(path), path, culprit)


@pytest.mark.parametrize("field, value, culprit", CONFIG_FIELDS)
def test_a_config_that_disagrees_with_the_tensors_ckpt(field, value, culprit, tmp_path):
    path = write_ckpt(tmp_path / "m.ckpt", gemma_pytorch_state(random_tensors()))
    config = minigemma.config.from_hf_config({**HF_CONFIG, field: value})
    culprit = {"model.embed_tokens.weight": "embedder.weight", "self_attn.q_proj.weight":
               "self_attn.qkv_proj.weight", "self_attn.k_proj.weight":
               "self_attn.qkv_proj.weight"}.get(culprit, culprit)
    raises(lambda: minigemma.load(path, config=config), path, culprit)


@pytest.mark.parametrize("field, value, culprit", [f for f in CONFIG_FIELDS
                                                   if f[0] != "vocab_size"])
def test_gguf_metadata_that_disagrees_with_the_tensors(field, value, culprit, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", gguf_tensors(random_tensors()),
                      {**HF_CONFIG, field: value})
    raises(lambda: minigemma.load(path), path)  # a layer count, a shape or a head size named


def test_a_missing_config_json(tmp_path):
    path = write_hf(tmp_path / "hf", random_tensors())
    os.remove(os.path.join(path, "config.json"))
    raises(lambda: minigemma.load(path), os.path.join(path, "config.json"), "missing",
           error=minigemma.ConfigNotFoundError)


@pytest.mark.parametrize("text, fragment", [
    (b"\xff\xfe{}", "not valid JSON"), (b"[" * 100_000, "not valid JSON"),
    (json.dumps({**HF_CONFIG, "rope_parameters": [1]}).encode(), "rope_parameters must be a JSON"),
    (json.dumps({**HF_CONFIG, "model_type": ["gemma"]}).encode(), "model_type"),
    (json.dumps({**HF_CONFIG, "model_type": "gemma2", "num_hidden_layers": "2"}).encode(),
     "num_hidden_layers must be an integer in 1..10000"),
    (json.dumps({**HF_CONFIG, "model_type": "gemma3", "text_config": 5}).encode(),
     "text_config must be a JSON object"),
    (json.dumps({**HF_CONFIG, "model_type": "gemma2", "sliding_window_pattern": 0}).encode(),
     "sliding_window_pattern must be an integer in 1..10000"),
    (json.dumps({**HF_CONFIG, "num_attention_heads": True}).encode(), "n_heads"),
])
def test_a_config_json_of_the_wrong_shape(text, fragment, tmp_path):
    path = write_hf(tmp_path / "hf", random_tensors())
    with open(os.path.join(path, "config.json"), "wb") as f:
        f.write(text)
    raises(lambda: minigemma.load(path), os.path.join(path, "config.json"), fragment,
           error=minigemma.ConfigError)


def test_a_directory_with_two_checkpoints_of_one_format(tmp_path):
    state = gemma_pytorch_state(random_tensors())
    write_ckpt(tmp_path / "a.ckpt", state)
    write_ckpt(tmp_path / "b.ckpt", state)
    raises(lambda: minigemma.load(tmp_path, config=CONFIG), "holds 2 .ckpt files",
           error=minigemma.CheckpointFormatError)


# ----------------------------------------------------------------------------------------------
# NaN and infinity: in the weights (check_weights) and in the logits (never returned)


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_check_weights_names_the_tensor_and_the_first_bad_index(kind, value, tmp_path):
    tensors = random_tensors()
    # Quantized: a scale of NaN or inf spoils its row (int8) or its block of 32 (Q8_0); times a
    # stored 0, an infinite scale gives NaN, so only the index is certain.
    holds = f"tensor {UP} holds " + ("" if kind in ("ckpt-int8", "gguf-q8_0") else str(value))
    if kind == "ckpt-int8":
        state = quantize(gemma_pytorch_state(tensors))
        state[UP + "_scaler"][77] = float(value)
        path, given, index = write_ckpt(tmp_path / "q.ckpt", state), CONFIG, "(77, 0)"
    elif kind == "gguf-q8_0":
        stored = gguf_tensors(tensors, quantized=True)
        blocks = stored[gguf_name(UP)][0].copy()
        blocks[77, 34:36] = np.array([value], np.float16).view(np.uint8)  # block 1 of row 77
        stored[gguf_name(UP)] = (blocks, gguf.GGMLQuantizationType.Q8_0)
        path, given, index = write_gguf(tmp_path / "q.gguf", stored, HF_CONFIG), None, "(77, 32)"
    else:
        tensors[UP][77, 5] = value
        tensors[UP][90, 1] = value
        path, given = write_format(kind, tmp_path, tensors)
        index = "(77, 5)"
    error = raises(lambda: minigemma.load(path, config=given, check_weights=True), path, holds,
                   f"at index {index}", error=minigemma.NonFiniteWeightsError)
    assert "first non-finite value" in str(error)
    model = minigemma.load(path, config=given)  # unchecked, it loads; its forward then refuses
    raises(lambda: model.forward(PROMPT), "layer 1 (layers.1.ffn_out)", f"weight {UP} holds",
           error=minigemma.NonFiniteError)


def test_a_nan_norm_weight_is_named_too(tmp_path):
    tensors = random_tensors()
    tensors["model.norm.weight"][3] = np.nan
    path = write_hf(tmp_path / "hf", tensors)
    raises(lambda: minigemma.load(path, check_weights=True),
           "tensor model.norm.weight holds nan at index (3,)")
    raises(lambda: minigemma.load(path).forward(PROMPT), "final_norm",
           "weight model.norm.weight holds nan at index (3,)")


def test_non_finite_logits_name_the_first_layer_and_leave_the_cache_as_it_was(tmp_path):
    tensors = random_tensors()
    tensors["model.layers.0.self_attn.v_proj.weight"][4, 9] = np.inf
    model = minigemma.load(write_hf(tmp_path / "hf", tensors))
    cache = model.new_cache(16)
    raises(lambda: model.forward(PROMPT, cache), "5 tokens after 0 cached positions",
           "layer 0 (layers.0.attn_out)",
           "weight model.layers.0.self_attn.v_proj.weight holds inf at index (4, 9)")
    assert cache.length == 0
    record = {}
    with pytest.raises(minigemma.NonFiniteError):
        model.forward(PROMPT, record=record, last_only=True)
    assert not np.isfinite(record["logits"]).all()  # the caller's record is filled as usual


def test_the_decode_engine_refuses_non_finite_logits_as_the_reference_does(tmp_path):
    """Generation runs on the numba kernels (decode.Decoder): their logits are checked too, and
    the error is the reference forward's, naming the first layer."""
    from minigemma.decode import Decoder
    tensors = random_tensors()
    tensors["model.layers.0.self_attn.v_proj.weight"][4, 9] = np.inf
    model = minigemma.load(write_hf(tmp_path / "hf", tensors))
    decoder = Decoder(model)
    assert decoder.on_kernels
    named = ("layer 0 (layers.0.attn_out)",
             "weight model.layers.0.self_attn.v_proj.weight holds inf at index (4, 9)")
    cache = model.new_cache(16)
    raises(lambda: decoder.prefill(PROMPT, cache), "5 tokens after 0 cached positions", *named,
           error=minigemma.NonFiniteError)
    raises(lambda: decoder.step(PROMPT[0], cache), "1 tokens after 0 cached positions", *named)
    assert cache.length == 0
    caches = [model.new_cache(16), model.new_cache(16)]
    raises(lambda: decoder.step_many([2, 17], caches), *named)
    raises(lambda: decoder.prefill_many([PROMPT, PROMPT[:2]], caches), *named)
    assert [c.length for c in caches] == [0, 0]


def gemma3_with(bad_weight, index):
    """A tiny random Gemma 3 (local and global layers, QK-norm) with one weight set to inf."""
    from minigemma.config import Gemma3Config
    from minigemma.gemma3 import Gemma3, expected_shapes_v2
    config = Gemma3Config(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1,
                          head_dim=16, ffn_dim=128, max_positions=64,
                          layer_types=("sliding_attention", "full_attention"), sliding_window=4,
                          query_pre_attn_scalar=16, qk_norm=True, attn_softcap=None,
                          final_softcap=None, global_rope_base=1e6)
    rng = np.random.default_rng(3)
    weights = {n: (rng.standard_normal(shape) * (0.5 if len(shape) == 1 else shape[1] ** -0.5)
                   ).astype(np.float32) for n, shape in expected_shapes_v2(config).items()}
    weights[bad_weight][index] = np.inf
    return Gemma3(config, weights)


@pytest.mark.parametrize("engine", ["forward", "decoder"])
def test_gemma3_non_finite_logits_name_the_layer_and_spend_the_cache(engine):
    from minigemma.decode_gemma3 import Decoder3
    model = gemma3_with("model.layers.1.mlp.up_proj.weight", (5, 7))
    run = model.forward if engine == "forward" else Decoder3(model).prefill
    cache = model.new_cache(16)
    raises(lambda: run(PROMPT, cache), "layer 1 (layers.1.ffn_out)",
           "weight model.layers.1.mlp.up_proj.weight holds inf at index (5, 7)",
           error=minigemma.NonFiniteError)
    # Its sliding-window ring was overwritten past the refused position: never reused silently.
    raises(lambda: model.forward(PROMPT, cache), "cache: a forward from position 0 gave "
           "non-finite logits; start a new one with model.new_cache()",
           error=minigemma.GenerationError)


def test_cli_generate_on_a_nan_checkpoint_names_the_layer_in_one_line(tmp_path):
    tensors = random_tensors()
    tensors["model.layers.1.self_attn.o_proj.weight"][3, 1] = np.nan
    path = write_hf(tmp_path / "hf", tensors)
    shutil.copy(TOKENIZER, os.path.join(path, "tokenizer.model"))
    result = cli("generate", "--weights", path, "--max-new-tokens", "4", "Once upon a time")
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    assert "layer 1 (layers.1.resid_attn)" in err.splitlines()[-1]  # o_proj adds it there
    assert "model.layers.1.self_attn.o_proj.weight holds nan at index (3, 1)" in err
    result = cli("generate", "--weights", path, "--check-weights", "Once upon a time")
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    assert "tensor model.layers.1.self_attn.o_proj.weight holds nan at index (3, 1)" in \
        err.splitlines()[-1]
    assert result.stdout == b""  # refused before any text


def test_values_that_overflow_are_named_without_blaming_a_weight(tmp_path):
    tensors = random_tensors()
    for name in ("gate_proj", "up_proj"):  # finite weights whose product overflows float32
        tensors[f"model.layers.1.mlp.{name}.weight"] *= np.float32(1e30)
    model = minigemma.load(write_hf(tmp_path / "hf", tensors))
    with np.errstate(over="ignore", invalid="ignore"):
        raises(lambda: model.forward(PROMPT), "layer 1 (layers.1.ffn_out)",
               "weights used there are finite")


def test_check_weights_is_memory_bounded(tmp_path, monkeypatch):
    """The scan widens a block of rows at a time: never a float copy of a whole weight."""
    tensors = random_tensors()
    model = minigemma.load(write_hf(tmp_path / "hf", tensors))
    widened = []
    real = minigemma.model.widen_rows
    monkeypatch.setattr(minigemma.model, "widen_rows",
                        lambda w, rows, dtype: widened.append(rows) or real(w, rows, dtype))
    from minigemma.checkpoint import check_finite
    big = np.zeros((1 << 16, 256), np.uint16)  # 16 M weights: 64 MB as float32
    check_finite({"big": big}, "here")
    assert len(widened) == 4 and all(r.stop - r.start == 1 << 14 for r in widened)


# ----------------------------------------------------------------------------------------------
# Tokenizers


def test_tokenizer_missing_and_not_sentencepiece(tmp_path):
    raises(lambda: minigemma.Tokenizer(tmp_path / "absent.model"), "absent.model",
           error=minigemma.TokenizerNotFoundError)
    (tmp_path / "bad.model").write_bytes(b"\x00not a protobuf" * 20)
    raises(lambda: minigemma.Tokenizer(tmp_path / "bad.model"), "bad.model",
           "is not a SentencePiece tokenizer.model", error=minigemma.TokenizerError)


def renamed_piece(tmp_path, old, new):
    """The tiny tokenizer with one piece renamed, rewritten through SentencePiece's protobuf."""
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(TOKENIZER, "rb").read())
    next(p for p in proto.pieces if p.piece == old).piece = new
    path = tmp_path / "renamed.model"
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.mark.parametrize("piece", ["<end_of_turn>", "<start_of_turn>", "<eos>"])
def test_tokenizer_without_a_special_piece(piece, tmp_path):
    path = renamed_piece(tmp_path, piece, piece.replace("<", "[").replace(">", "]"))
    raises(lambda: minigemma.Tokenizer(path), str(path), f"has no {piece} piece",
           error=minigemma.TokenizerError)


def test_text_that_is_not_utf8_is_named():
    tok = minigemma.Tokenizer(TOKENIZER)
    raises(lambda: tok.encode("caf\udce9"), "not valid UTF-8 text: the byte 0xe9 at character 3",
           error=minigemma.GenerationError)
    raises(lambda: tok.encode(b"bytes"), "text must be a str", error=minigemma.GenerationError)
    raises(lambda: tok.chat_ids([{"role": ["user"], "content": "hi"}]), "has role ['user']",
           error=minigemma.GenerationError)


def test_a_vocabulary_that_does_not_match_the_embedding(tmp_path):
    tok = minigemma.Tokenizer(TOKENIZER)
    path = write_hf(tmp_path / "hf", {**random_tensors(), "model.embed_tokens.weight":
                                      np.zeros((600, 64), np.float32)},
                    {**HF_CONFIG, "vocab_size": 600})
    model = minigemma.load(path)
    raises(lambda: minigemma.generate(model, tok, "Hello"), "512 pieces", "600 token rows",
           error=minigemma.TokenizerError)


def test_the_128_padding_rows_are_not_a_mismatch(tmp_path):
    """A 256128-row embedding (Flax/Kaggle conversions) with Gemma's 256000-piece tokenizer."""
    from minigemma.tiny_tokenizer import pad_tokenizer
    config = {**HF_CONFIG, "vocab_size": 256128, "hidden_size": 8, "head_dim": 4,
              "intermediate_size": 8, "num_hidden_layers": 1}
    c = minigemma.config.from_hf_config(config)
    rng = np.random.default_rng(1)
    tensors = {n: rng.standard_normal(s).astype(np.float32) * 0.1
               for n, s in expected_shapes(c).items()}
    model = minigemma.load(write_hf(tmp_path / "hf", tensors, config))
    tok = minigemma.Tokenizer(pad_tokenizer(TOKENIZER, str(tmp_path / "t.model"), 256000))
    assert len(minigemma.generate(model, tok, "Hello", max_new_tokens=2)) >= 0
    assert model.forward([2, 255999]).shape == (2, 256000)


# ----------------------------------------------------------------------------------------------
# Prompts and generation


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer) of a 32-position tiny model."""
    import tempfile
    directory = tempfile.mkdtemp()
    model = minigemma.load(write_hf(os.path.join(directory, "hf"), random_tensors(3)))
    yield model, minigemma.Tokenizer(TOKENIZER)
    shutil.rmtree(directory)


@pytest.mark.parametrize("options, fragment", [
    (dict(temperature=-1.0), "temperature must be a number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a number >= 0"),
    (dict(temperature="hot"), "temperature must be a number >= 0"),
    (dict(temperature=1.0, top_k=0), "top_k must be an integer >= 1"),
    (dict(temperature=1.0, top_k=2.5), "top_k must be an integer >= 1"),
    (dict(temperature=1.0, top_p=0.0), "top_p must be in (0, 1]"),
    (dict(temperature=1.0, top_p=1.01), "top_p must be in (0, 1]"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer >= 1"),
])
def test_sampling_arguments_out_of_range(tiny, options, fragment):
    model, tok = tiny
    raises(lambda: minigemma.generate(model, tok, "Hello", **options), fragment,
           error=minigemma.GenerationError)


def test_empty_and_over_long_prompts(tiny):
    model, tok = tiny
    raises(lambda: minigemma.generate(model, tok, ""), "prompt is empty",
           error=minigemma.GenerationError)
    raises(lambda: minigemma.generate(model, tok, []), "prompt has no token ids",
           error=minigemma.GenerationError)
    raises(lambda: minigemma.generate(model, tok, list(range(2, 40))),
           "38 tokens do not fit in the context of 32 positions", error=minigemma.ContextFullError)
    raises(lambda: model.forward(list(range(2, 40))), "38 tokens exceed the model's max positions",
           error=minigemma.ContextFullError)


def test_max_new_tokens_past_the_context_stops_cleanly_and_says_so(tiny):
    model, tok = tiny
    stats = {}
    with pytest.warns(UserWarning, match=r"the context is full \(32 positions\)"):
        minigemma.generate(model, tok, list(range(2, 22)), max_new_tokens=50, stop=(), stats=stats)
    assert stats["stop"] == "context full" and stats["new_tokens"] == 12


def test_a_chat_that_outgrows_its_context_asks_for_a_reset(tiny):
    model, tok = tiny
    chat = Chat(model, tok, Sampler(), max_new_tokens=40)
    with pytest.warns(UserWarning, match="context is full"):
        "".join(chat.reply("Hello"))
    raises(lambda: chat.reply("More"), "do not fit in the context of 32 positions",
           error=minigemma.ContextFullError)
    raises(lambda: chat.reply("   "), "the message is empty", error=minigemma.GenerationError)


def test_bad_token_ids_and_caches(tiny):
    model, _ = tiny
    for ids, fragment in (([2, 512], "id 512 is out of range"), ([], "token_ids is empty"),
                          ([[2]], "must be a 1-D array")):
        raises(lambda: model.forward(ids), fragment, error=minigemma.GenerationError)
    raises(lambda: model.new_cache(2.5), "max_len must be in 1..32", error=minigemma.GenerationError)
    raises(lambda: model.forward([2], cache="cache"), "cache was made for a different model",
           error=minigemma.GenerationError)
    raises(lambda: Gemma(CONFIG, {}, dtype=np.float16), "dtype must be float32 or float64",
           error=minigemma.GenerationError)


# ----------------------------------------------------------------------------------------------
# Memory: refused before allocating


def test_a_huge_cache_is_refused_before_allocating():
    model = Gemma(gemma_7b(max_positions=10 ** 7), {})
    error = raises(lambda: model.new_cache(10 ** 7), "a KV cache of 10000000 positions (float32) "
                   "needs 9,175.04 GB", "MemAvailable", error=minigemma.InsufficientMemoryError)
    assert isinstance(error, MemoryError)


def test_float64_and_cache_refusals_follow_the_memory_available(tiny, monkeypatch, tmp_path):
    monkeypatch.setattr(errors, "available_memory", lambda: 200 * 10 ** 6)  # 200 MB left
    raises(lambda: Gemma(gemma_7b(), {}).new_cache(), "a KV cache of 8192 positions (float32) "
           "needs 7.52 GB but only 0.20 GB", error=minigemma.InsufficientMemoryError)
    model = minigemma.load(write_hf(tmp_path / "hf", random_tensors()), dtype=np.float64)
    model.forward(PROMPT)  # small: fine
    # A float64 prompt of 2048 tokens over a 256000-token vocabulary: 4.19 GB of logits alone.
    wide = Gemma(GemmaConfig(vocab_size=256000, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1,
                             head_dim=8, ffn_dim=8, max_positions=4096), {}, dtype=np.float64)
    raises(lambda: wide.forward(list(range(2, 2050))), "a forward of 2048 tokens in float64 "
           "needs 4.26 GB", error=minigemma.InsufficientMemoryError)
    monkeypatch.setattr(errors, "available_memory", lambda: None)  # not Linux: no check
    errors.check_memory(10 ** 15, "anything")


def test_a_dequantized_copy_is_refused_before_allocating(monkeypatch):
    from minigemma.quant import Int8Rows
    rows = np.broadcast_to(np.int8(1), (1 << 16, 1 << 12))  # 256 MB of int8 that take no memory
    w = Int8Rows(rows, np.ones(1 << 16, np.float32))
    monkeypatch.setattr(errors, "available_memory", lambda: 100 * 10 ** 6)
    raises(lambda: w.dequantize(), "65536 rows", "1.07 GB", error=minigemma.InsufficientMemoryError)
    assert w.dequantize(slice(0, 4)).shape == (4, 1 << 12)


# ----------------------------------------------------------------------------------------------
# Goldens


PROMPTS = [{"name": "one", "ids": [2]}, {"name": "short", "ids": PROMPT}]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(weights directory, a golden of PROMPTS recorded from it)."""
    base = tmp_path_factory.mktemp("golden")
    weights = write_hf(base / "hf", random_tensors(5))
    out = str(base / "G")
    golden.record(weights, PROMPTS, out, new_tokens=4)
    return weights, out


def copy_golden(recorded, tmp_path):
    return shutil.copytree(recorded[1], tmp_path / "G")


def test_golden_records_a_checksum_of_every_array(recorded):
    meta = json.load(open(os.path.join(recorded[1], "golden.json")))
    arrays = golden.load(recorded[1]).arrays
    assert set(meta["array_sha256"]) == set(arrays) and len(arrays) == 6


def test_golden_of_an_unknown_format_version(recorded, tmp_path):
    path = copy_golden(recorded, tmp_path)
    meta = json.load(open(path / "golden.json"))
    json.dump({**meta, "format_version": 7}, open(path / "golden.json", "w"))
    raises(lambda: golden.load(path), "golden.json: format 'minigemma-golden' version 7",
           "reads 'minigemma-golden' version 1", error=minigemma.GoldenError)


def test_golden_with_a_tampered_array(recorded, tmp_path):
    path = copy_golden(recorded, tmp_path)
    arrays = dict(np.load(path / "golden.npz"))
    arrays["short/logits"][2, 7] += 0.5  # a valid .npz whose numbers changed
    np.savez(path / "golden.npz", **arrays)
    raises(lambda: golden.load(path), "array short/logits does not match its sha256",
           error=minigemma.GoldenError)


def test_golden_with_a_damaged_npz(recorded, tmp_path):
    path = copy_golden(recorded, tmp_path)
    raw = bytearray((path / "golden.npz").read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    (path / "golden.npz").write_bytes(bytes(raw))
    raises(lambda: golden.load(path), "golden.npz", error=minigemma.GoldenError)


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m.update(prompts=[{"name": "one"}]), "lacks a name and token_ids"),
    (lambda m: m.update(precision={"compute_dtype": "float8"}), "is not a recipe"),
    (lambda m: m.pop("tolerances"), "lacks tolerances"),
    (lambda m: m.update(array_sha256=[]), "array_sha256 is not a JSON object"),
])
def test_golden_json_that_was_edited(recorded, tmp_path, edit, fragment):
    path = copy_golden(recorded, tmp_path)
    meta = json.load(open(path / "golden.json"))
    edit(meta)
    json.dump(meta, open(path / "golden.json", "w"))
    raises(lambda: golden.load(path), "golden.json", fragment, error=minigemma.GoldenError)


def test_other_weights_get_a_warning_naming_both_hashes(recorded, tmp_path):
    weights, path = recorded
    other = write_hf(tmp_path / "other", random_tensors(6))
    with pytest.warns(UserWarning, match="is not the file the golden was recorded from") as w:
        report = golden.check(path, other)
    message = str(w[0].message)
    recorded_hash = json.load(open(os.path.join(path, "golden.json")))["files"]["model.safetensors"]
    assert recorded_hash in message and golden.files.sha256_file(
        os.path.join(other, "model.safetensors")) in message
    assert not report.passed and message in report.problems


def write_prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cli(*args, env=None, preexec_fn=None, stdin=b""):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT,
           "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "minigemma", *args], capture_output=True,
                          env=env, preexec_fn=preexec_fn, input=stdin, timeout=600)


def limit_file_size(n_bytes):
    """A preexec_fn: no file can grow past n_bytes (RLIMIT_FSIZE), as on a full disk. Python
    ignores SIGXFSZ, so a write past the limit fails with EFBIG ("File too large")."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return limit


@pytest.fixture(scope="module")
def many_prompts(recorded, tmp_path_factory):
    """(prompts file of 40 prompts, the largest file size of their golden) for full-disk tests."""
    base = tmp_path_factory.mktemp("many")
    rows = [{"name": f"p{i}", "ids": PROMPT[:1 + i % 5]} for i in range(40)]
    prompts = write_prompts(base / "p.jsonl", rows)
    golden.record(recorded[0], prompts, str(base / "G"), new_tokens=2)
    return prompts, max(os.path.getsize(base / "G" / n) for n in os.listdir(base / "G"))


@pytest.mark.parametrize("limit", [1000, 0.5, -1])
def test_a_record_that_hits_a_full_disk_leaves_the_previous_golden(recorded, many_prompts,
                                                                   tmp_path, limit):
    """With RLIMIT_FSIZE below the size of the golden's largest file, recording over an existing
    golden (--force) fails mid-write with EFBIG, as on a full disk: one line, nothing left
    behind, and the golden at --out is the previous one, byte for byte, and still verifies."""
    weights, _ = recorded
    prompts, largest = many_prompts
    out = copy_golden(recorded, tmp_path)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    n_bytes = {1000: 1000, 0.5: largest // 2, -1: largest - 1}[limit]
    result = cli("golden", "record", "--weights", weights, "--prompts", prompts, "--out",
                 str(out), "--force", "--new-tokens", "2", preexec_fn=limit_file_size(n_bytes))
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"minigemma: error: {out}: writing failed (File too large); "
                                    f"nothing was written there")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".G.")] == []
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    golden.load(out)


def test_a_record_killed_mid_write_leaves_the_previous_golden(recorded, many_prompts, tmp_path):
    """SIGKILL (no clean-up can run) while golden.npz is being written: --out still holds the
    previous golden, byte for byte; only a hidden .G.partial-* directory is left beside it."""
    weights, _ = recorded
    out = copy_golden(recorded, tmp_path)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "minigemma", "golden", "record", "--weights",
                             weights, "--prompts", many_prompts[0], "--out", str(out), "--force",
                             "--new-tokens", "2"], stderr=subprocess.PIPE, env=env)
    for line in proc.stderr:  # a progress line per prompt: the .npz is being written
        if line.startswith(b"minigemma: [2/40]"):
            break
    proc.kill()
    proc.wait(timeout=60)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    golden.load(out)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".G.") and "partial" not in n] == []


def test_a_record_interrupted_while_replacing_keeps_one_complete_golden(recorded, tmp_path,
                                                                         monkeypatch):
    """The swap of the old golden for the new one: killed between its two renames (simulated),
    the old golden survives under its backup name and load() says where."""
    weights, _ = recorded
    out = copy_golden(recorded, tmp_path)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the process died here
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        golden.record(weights, PROMPTS, str(out), new_tokens=1, overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    backup = golden.files.previous_path(out)
    raises(lambda: golden.load(out), "golden.json: missing", f"the golden it replaced is at {backup}",
           error=minigemma.GoldenNotFoundError)
    golden.load(backup)
    golden.record(weights, PROMPTS, str(out), new_tokens=1, overwrite=True)  # the next run tidies
    assert not os.path.exists(backup) and golden.load(out)


def test_safetensors_write_on_a_full_disk_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"a": np.arange(10, dtype=np.float32)}, str(path))
    before = path.read_bytes()
    code = ("import numpy as np, sys; sys.path.insert(0, %r);"
            "from minigemma.formats import safetensors;"
            "safetensors.write(%r, {'a': np.zeros(10 ** 6, np.float32)})" % (ROOT, str(path)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            preexec_fn=limit_file_size(100_000), timeout=120)
    assert b"OSError" in result.stderr and path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


@pytest.mark.parametrize("raw, fragment", [
    (b'{"name": "a", "text": "caf\xe9"}\n', "p.jsonl:1: not valid UTF-8 text (byte 0xe9"),
    (b'{"name": "a", "ids": [2]}\n\xff\n', "p.jsonl:2: not valid UTF-8 text (byte 0xff"),
    (b'{"name": "a", "ids": "2"}\n', "'ids' must be a non-empty list"),
])
def test_a_prompts_file_that_is_not_utf8_or_not_prompts(recorded, tmp_path, raw, fragment):
    path = tmp_path / "p.jsonl"
    path.write_bytes(raw)
    raises(lambda: golden.read_prompts(str(path)), fragment, error=minigemma.GoldenError)
    result = cli("golden", "record", "--weights", recorded[0], "--prompts", str(path), "--out",
                 str(tmp_path / "G"))
    assert result.returncode == 1 and "Traceback" not in result.stderr.decode()
    assert fragment in result.stderr.decode() and not os.path.exists(tmp_path / "G")


# ----------------------------------------------------------------------------------------------
# The command line: one line per error, the culprit named


def test_cli_prompts_that_are_not_utf8(tmp_path):
    path = write_hf(tmp_path / "hf", random_tensors())
    shutil.copy(TOKENIZER, os.path.join(path, "tokenizer.model"))
    result = cli("generate", "--weights", path, os.fsdecode(b"caf\xe9"))
    assert result.returncode == 2 and "the prompt is not valid UTF-8 text: the byte 0xe9 at " \
                                      "character 3" in result.stderr.decode()
    result = cli("chat", "--weights", path, "--max-new-tokens", "3",
                 stdin=b"Hello\ncaf\xe9\n/reset\nHello\n")
    err = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in err
    assert "line 2 of the input is not valid UTF-8 text (byte 0xe9 at byte 3); it was skipped" \
        in err
    out = result.stdout.decode()
    assert out[:len(out) // 2] == out[len(out) // 2:]  # after /reset, the first answer again


def test_cli_generation_past_the_context_stops_and_says_so(tmp_path):
    path = write_hf(tmp_path / "hf", random_tensors())
    shutil.copy(TOKENIZER, os.path.join(path, "tokenizer.model"))
    result = cli("generate", "--weights", path, "--max-new-tokens", "100", "Once upon a time")
    err = result.stderr.decode()
    assert result.returncode == 0 and "the context is full (32 positions)" in err
    assert "stopped: context full" in err


def test_cli_memory_refusal_is_one_line(tmp_path):
    """A context of a billion positions: its KV cache (512 GB) is refused before allocating."""
    path = write_hf(tmp_path / "hf", random_tensors(),
                    {**HF_CONFIG, "max_position_embeddings": 10 ** 9})
    shutil.copy(TOKENIZER, os.path.join(path, "tokenizer.model"))
    result = cli("generate", "--weights", path, "--max-new-tokens", str(10 ** 9), "Hi")
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err
    assert "a KV cache of 1000000000 positions (float32) needs 512.00 GB" in err.splitlines()[-1]
