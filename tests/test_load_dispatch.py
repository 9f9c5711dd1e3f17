"""minigemma.load / formats.read_checkpoint: which format a path holds, and where the config
comes from (the checkpoint, the caller's config=, or the gemma-2b / gemma-7b presets by shape).

The checkpoints are written by the real tools: transformers' save_pretrained, torch.save in
gemma_pytorch's layout (test_pytorch_ckpt.py), the gguf package's writer. The GGUF and Orbax
readers are other modules: here they are stand-ins that record what the dispatch asked them.
"""

import json
import pathlib
import shutil
import sys
import types

import gguf
import numpy as np
import pytest
import torch

import minigemma
from minigemma import gemma_2b, gemma_7b
from minigemma.checkpoint import expected_shapes as hf_shapes
from minigemma.config import from_hf_config
from minigemma.formats import (CheckpointFormatError, match_preset, pytorch, read_checkpoint,
                               safetensors)
from helpers import finish_gguf
from hf_peer import TINY, random_gemma
from test_pytorch_ckpt import gemma_pytorch_state, save_ckpt

TOKENIZER = pathlib.Path(__file__).parent.parent / "examples" / "tiny-gemma" / "tokenizer.model"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"hf": HF directory, "ckpt": the same weights as a gemma_pytorch .ckpt, "config": the
    HF config.json} for the mqa layout."""
    model = random_gemma(TINY["mqa"], seed=31)
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(d / "hf")
    ckpt = save_ckpt(gemma_pytorch_state(model), d / "gemma-tiny.ckpt")
    return {"hf": d / "hf", "ckpt": ckpt, "config": d / "hf" / "config.json"}


def raises(call, *fragments, error=ValueError):
    with pytest.raises(error) as e:
        call()
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in {str(e.value)!r}"


def same_tensors(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(np.asarray(a[name]), np.asarray(b[name])), name


# ----------------------------------------------------------------------------------------------
# Formats


def test_hugging_face_directory(tiny):
    config, tensors, description = read_checkpoint(tiny["hf"])
    assert description == (f"Hugging Face safetensors in {tiny['hf']}; "
                           f"config from {tiny['config']}")
    assert config == from_hf_config(json.loads(tiny["config"].read_text()))
    same_tensors(tensors, safetensors.read_checkpoint(tiny["hf"]))


def test_ckpt_file_gives_the_same_tensors_as_the_hf_directory(tiny):
    config, tensors, description = read_checkpoint(tiny["ckpt"], config=tiny["config"])
    assert description == (f"gemma_pytorch checkpoint {tiny['ckpt']} (float weights); "
                           f"config from {tiny['config']}")
    same_tensors(tensors, safetensors.read_checkpoint(tiny["hf"]))
    assert config == read_checkpoint(tiny["hf"])[0]


def test_kaggle_directory_with_one_ckpt_and_a_tokenizer(tiny, tmp_path):
    shutil.copy(tiny["ckpt"], tmp_path / "gemma-tiny.ckpt")
    shutil.copy(TOKENIZER, tmp_path / "tokenizer.model")
    _, tensors, description = read_checkpoint(tmp_path, config=tiny["config"])
    assert description.startswith(f"gemma_pytorch checkpoint {tmp_path / 'gemma-tiny.ckpt'} ")
    same_tensors(tensors, safetensors.read_checkpoint(tiny["hf"]))


def test_directory_with_two_formats_reads_safetensors_and_says_so(tiny, tmp_path):
    directory = shutil.copytree(tiny["hf"], tmp_path / "both")
    shutil.copy(tiny["ckpt"], directory / "gemma-tiny.ckpt")
    _, tensors, description = read_checkpoint(directory)
    assert description.startswith(f"Hugging Face safetensors in {directory}; ")
    assert description.endswith(f"(also found gemma-tiny.ckpt in {directory}, not read)")
    same_tensors(tensors, safetensors.read_checkpoint(tiny["hf"]))


def test_directory_with_two_ckpts(tiny, tmp_path):
    for name in ("a.ckpt", "b.ckpt"):
        shutil.copy(tiny["ckpt"], tmp_path / name)
    raises(lambda: read_checkpoint(tmp_path), f"{tmp_path}: holds 2 .ckpt files (a.ckpt, b.ckpt); "
                                              f"expected one")


def test_empty_directory(tmp_path):
    shutil.copy(TOKENIZER, tmp_path / "tokenizer.model")
    raises(lambda: minigemma.load(tmp_path),
           f"{tmp_path}: no checkpoint found; expected a Hugging Face directory (config.json + "
           f"model.safetensors), a gemma_pytorch .ckpt file", error=CheckpointFormatError)


def test_missing_path(tmp_path):
    raises(lambda: minigemma.load(tmp_path / "nowhere"),
           f"{tmp_path / 'nowhere'}: not a checkpoint directory or file", error=FileNotFoundError)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_file_of_another_kind(tiny, name):
    path = tiny["hf"] / name
    raises(lambda: minigemma.load(path), f"{path}: starts with", "neither a torch.save zip archive "
                                         "(.ckpt) nor GGUF", error=CheckpointFormatError)


def write_gguf(path):
    """A GGUF file written by the gguf package (header, one key, one tensor)."""
    writer = gguf.GGUFWriter(str(path), "gemma")
    writer.add_block_count(2)
    finish_gguf(writer, {"token_embd.weight": (np.zeros((4, 8), np.float32),
                                               gguf.GGMLQuantizationType.F32)})
    return path


def stand_in_reader(monkeypatch, module, tiny):
    """Install minigemma.formats.<module> whose read(path) returns the tiny HF checkpoint's
    config dict and tensors, recording the paths it was called with."""
    calls = []

    def read(path):
        calls.append(path)
        return json.loads(tiny["config"].read_text()), safetensors.read_checkpoint(tiny["hf"])

    monkeypatch.setitem(sys.modules, f"minigemma.formats.{module}", types.SimpleNamespace(read=read))
    return calls


def test_gguf_file_goes_to_the_gguf_reader(tiny, tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf")
    calls = stand_in_reader(monkeypatch, "gguf", tiny)
    config, tensors, description = read_checkpoint(path)
    assert calls == [str(path)]
    assert description == f"GGUF file {path}; config from {path}"
    assert config == read_checkpoint(tiny["hf"])[0]
    ids = np.array([2, 5, 9])
    np.testing.assert_array_equal(minigemma.load(path).forward(ids),
                                  minigemma.load(tiny["hf"]).forward(ids))


def test_gguf_reader_missing(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setitem(sys.modules, "minigemma.formats.gguf", None)  # import fails
    raises(lambda: read_checkpoint(path), f"{path}: reading this GGUF file needs "
                                          f"minigemma.formats.gguf, which could not be imported",
           error=CheckpointFormatError)


@pytest.mark.parametrize("layout", ["ocdbt", "zarr", "kaggle"])
def test_orbax_directory_goes_to_the_flax_reader(tiny, tmp_path, monkeypatch, layout):
    """Orbax with OCDBT (_METADATA, manifest.ocdbt, d/), without it (a .zarray per parameter),
    and Kaggle's archive (the checkpoint in 2b/ beside tokenizer.model)."""
    root = tmp_path / "gemma-flax"
    checkpoint = root / "2b" if layout == "kaggle" else root
    if layout == "zarr":
        (checkpoint / "transformer.embedder.input_embedding").mkdir(parents=True)
        (checkpoint / "transformer.embedder.input_embedding" / ".zarray").write_text("{}")
    else:
        (checkpoint / "d").mkdir(parents=True)
        (checkpoint / "_METADATA").write_text("{}")
        (checkpoint / "manifest.ocdbt").write_bytes(b"")
    shutil.copy(TOKENIZER, root / "tokenizer.model")
    calls = stand_in_reader(monkeypatch, "flax", tiny)
    _, _, description = read_checkpoint(root, config=tiny["config"])
    assert calls == [str(checkpoint)]
    assert description == f"Orbax checkpoint {checkpoint}; config from {tiny['config']}"


def test_flax_reader_missing(tmp_path, monkeypatch):
    (tmp_path / "_METADATA").write_text("{}")
    monkeypatch.setitem(sys.modules, "minigemma.formats.flax", None)
    raises(lambda: read_checkpoint(tmp_path), f"{tmp_path}: reading this Orbax checkpoint needs "
                                              f"minigemma.formats.flax, which could not be imported",
           error=CheckpointFormatError)


# ----------------------------------------------------------------------------------------------
# config=


def test_config_given_as_a_gemma_config_overrides_config_json(tiny):
    given = from_hf_config(json.loads(tiny["config"].read_text()))
    config, _, description = read_checkpoint(tiny["hf"], config=given)
    assert config is given
    assert description.endswith("; config given as a GemmaConfig")


def test_config_errors(tiny, tmp_path):
    raises(lambda: minigemma.load(tiny["ckpt"], config=tmp_path / "config.json"),
           f"{tmp_path / 'config.json'}: missing; config= names a Hugging Face config.json",
           error=FileNotFoundError)
    raises(lambda: minigemma.load(tiny["ckpt"], config={"hidden_size": 64}),
           "config must be a path to a config.json or a GemmaConfig, got dict")
    given = from_hf_config(json.loads(tiny["config"].read_text()), normalizer="bf16")
    raises(lambda: minigemma.load(tiny["ckpt"], config=given),
           "config has normalizer 'bf16' but normalizer='exact' was asked for")
    (tmp_path / "bad.json").write_text('{"hidden_size": 64')
    raises(lambda: minigemma.load(tiny["ckpt"], config=tmp_path / "bad.json"),
           f"{tmp_path / 'bad.json'}: not valid JSON")


def test_ckpt_without_config_that_fits_no_preset(tiny):
    raises(lambda: minigemma.load(tiny["ckpt"]),
           f"{tiny['ckpt']}: no config given, and the tensor shapes match neither the gemma-2b nor "
           f"the gemma-7b preset (found 2 layers; embedder.weight (512, 64), model.norm.weight "
           f"(64,), model.layers.0.input_layernorm.weight (64,), "
           f"model.layers.0.self_attn.qkv_proj.weight (192, 64)", "pass config=",
           error=CheckpointFormatError)


# ----------------------------------------------------------------------------------------------
# Presets by shape. Shape-only stand-ins cost no memory; the end-to-end case saves zero-stride
# tensors (torch.expand of one element), whose storage torch.save writes as that one element.


@pytest.mark.parametrize("preset, name", [(gemma_2b, "gemma-2b"), (gemma_7b, "gemma-7b")])
@pytest.mark.parametrize("vocab", [256000, 256128])
@pytest.mark.parametrize("expected_shapes", [pytorch.expected_shapes, hf_shapes])
def test_match_preset_by_shapes(preset, name, vocab, expected_shapes):
    shapes = expected_shapes(preset(vocab_size=vocab))
    shapes["embedder.weight_scaler"] = (vocab,)  # not a weight: not compared
    config, description = match_preset(shapes, expected_shapes, "x.ckpt")
    assert config == preset(vocab_size=vocab)
    rows = " with 256128 embedding rows" if vocab == 256128 else ""
    assert description == f"config matched the {name} preset{rows} by tensor shapes"
    assert match_preset(shapes, expected_shapes, "x.ckpt", "bf16")[0].normalizer == "bf16"


@pytest.mark.parametrize("damage", ["extra layer", "missing layer", "wrong ffn", "wrong vocab"])
def test_match_preset_refuses_near_misses(damage):
    shapes = pytorch.expected_shapes(gemma_2b())
    if damage == "extra layer":
        shapes["model.layers.18.input_layernorm.weight"] = (2048,)
    elif damage == "missing layer":
        shapes = {n: s for n, s in shapes.items() if not n.startswith("model.layers.17.")}
    elif damage == "wrong ffn":
        shapes["model.layers.3.mlp.up_proj.weight"] = (16000, 2048)
    else:
        shapes["embedder.weight"] = (32000, 2048)
    raises(lambda: match_preset(shapes, pytorch.expected_shapes, "x.ckpt"),
           "x.ckpt: no config given, and the tensor shapes match neither the gemma-2b nor the "
           "gemma-7b preset (found ")


@pytest.mark.parametrize("preset, name", [(gemma_2b, "gemma-2b"), (gemma_7b, "gemma-7b")])
def test_ckpt_matched_to_a_preset_end_to_end(tmp_path, preset, name):
    one = torch.zeros(1)
    state = {n: one.expand(*s) for n, s in pytorch.expected_shapes(preset()).items()}
    path = save_ckpt(state, tmp_path / f"{name}.ckpt")
    assert path.stat().st_size < 1 << 20  # one float of storage, and the pickle
    config, tensors, description = read_checkpoint(path)
    assert config == preset()
    assert description == (f"gemma_pytorch checkpoint {path} (float weights); "
                           f"config matched the {name} preset by tensor shapes")
    assert {n: t.shape for n, t in tensors.items()} == hf_shapes(preset())
