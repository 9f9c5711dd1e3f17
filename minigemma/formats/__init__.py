"""Checkpoint formats: each module reads one format into tensors named and laid out as in the
Hugging Face Gemma checkpoint ([out, in] weights, raw RMSNorm weights w), memory-mapped where
the format allows.

`read_checkpoint(path)` looks at what it is given and picks the reader:

    a directory with config.json + model.safetensors   Hugging Face (safetensors.py)
    a .ckpt file, or a directory holding one           gemma_pytorch, Kaggle "PyTorch" (pytorch.py)
    a .gguf file, or a directory holding one           llama.cpp (gguf.py)
    an Orbax checkpoint directory                      google-deepmind/gemma, Kaggle "Flax" (flax.py)

A .ckpt carries no hyperparameters: pass config= (a config.json or a GemmaConfig), or the tensor
shapes are matched against the gemma-2b and gemma-7b presets.
"""

import importlib
import json
import os

import numpy as np

from ..config import GemmaConfig, Gemma3Config, config_from_hf, gemma_2b, gemma_7b
from ..errors import (CheckpointFormatError, CheckpointNotFoundError, ConfigError,
                      ConfigNotFoundError)
from . import pytorch, safetensors

PRESETS = {"gemma-2b": gemma_2b, "gemma-7b": gemma_7b}
PADDED_VOCAB = 256128  # the Flax/Kaggle embedding: 256000 tokens + 128 padding rows

# Files that mark a directory as an Orbax checkpoint (google-deepmind/gemma saves and restores
# its parameters with orbax.checkpoint): metadata files, the legacy msgpack tree, OCDBT's manifest.
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "orbax.checkpoint", "checkpoint",
                 "manifest.ocdbt")

EXPECTED = ("expected a Hugging Face directory (config.json + model.safetensors), a gemma_pytorch "
            ".ckpt file (or a directory holding one), a .gguf file, or an Orbax checkpoint "
            "directory")


def read_checkpoint(path, config=None, normalizer="exact"):
    """(GemmaConfig, {Hugging Face name: tensor}, description) for the checkpoint at `path`.

    config: None (read it from the checkpoint, or match a .ckpt's shapes against the presets),
    a path to a Hugging Face config.json, or a GemmaConfig; it takes precedence over a config the
    checkpoint carries. The description says which format was read and where the config came from.
    """
    path = os.fspath(path)
    kind, where, others = detect_format(path)
    given = given_config(config, normalizer) if config is not None else None
    if kind == "safetensors":
        config, tensors, description = read_hf_directory(where, given, normalizer)
    elif kind == "ckpt":
        config, tensors, description = read_ckpt(where, given, normalizer)
    else:
        config, tensors, description = read_with_module(kind, where, given, normalizer)
    if others:
        description += f" (also found {' and '.join(others)} in {path}, not read)"
    return config, tensors, description


# ----------------------------------------------------------------------------------------------
# Which format


def detect_format(path):
    """(kind, the file or directory to read, [other formats found beside it]).

    kind is "safetensors", "ckpt", "gguf" or "orbax". A directory holding several formats is read
    in that order of preference.
    """
    if os.path.isfile(path):
        return _file_format(path), path, []
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: not a checkpoint directory or file ({EXPECTED})")
    found = _directory_formats(path)
    if not found:
        if os.path.exists(os.path.join(path, "config.json")):  # HF directory missing its weights
            return "safetensors", path, []
        raise CheckpointFormatError(f"{path}: no checkpoint found; {EXPECTED}")
    (kind, where), others = found[0], [_describe_found(k, w) for k, w in found[1:]]
    if isinstance(where, list):
        if len(where) > 1:
            raise CheckpointFormatError(f"{path}: holds {len(where)} .{kind} files "
                                        f"({', '.join(os.path.basename(w) for w in where)}); "
                                        f"expected one, pass the file to load")
        where = where[0]
    return kind, where, others


def _file_format(path):
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":  # torch.save writes a zip archive
        return "ckpt"
    if magic == b"GGUF":
        return "gguf"
    hint = (" (a .safetensors file carries no config: pass the directory holding it and its "
            "config.json)" if path.endswith(".safetensors") else "")
    raise CheckpointFormatError(f"{path}: starts with {magic!r}, neither a torch.save zip archive "
                                f"(.ckpt) nor GGUF; {EXPECTED}{hint}")


def _directory_formats(path):
    """[(kind, path or list of files)] of the formats in a directory, most preferred first."""
    names = sorted(os.listdir(path))
    found = []
    if {"model.safetensors", "model.safetensors.index.json"} & set(names):
        found.append(("safetensors", path))
    for kind in ("ckpt", "gguf"):
        files = [os.path.join(path, n) for n in names if n.endswith("." + kind)]
        if files:
            found.append((kind, files))
    if _is_orbax(path):
        found.append(("orbax", path))
    else:  # Kaggle's Flax archive: <dir>/2b/ (the Orbax checkpoint) beside tokenizer.model
        subdirectories = [os.path.join(path, n) for n in names]
        orbax = [d for d in subdirectories if os.path.isdir(d) and _is_orbax(d)]
        if len(orbax) == 1:
            found.append(("orbax", orbax[0]))
    return found


def _is_orbax(directory):
    names = os.listdir(directory)
    if any(marker in names for marker in ORBAX_MARKERS):
        return True
    # Orbax without OCDBT: one zarr array directory per parameter
    return any(os.path.exists(os.path.join(directory, n, ".zarray")) for n in names)


def _describe_found(kind, where):
    """How the description names a format it did not read (safetensors is always read first)."""
    if isinstance(where, list):
        return ", ".join(os.path.basename(w) for w in where)
    return f"an Orbax checkpoint ({where})"


# ----------------------------------------------------------------------------------------------
# The config: given by the caller, carried by the checkpoint, or matched against the presets


def given_config(config, normalizer):
    """(GemmaConfig, where it came from) for the caller's config=: a config.json path or a
    GemmaConfig."""
    if isinstance(config, (GemmaConfig, Gemma3Config)):
        if config.normalizer != normalizer:
            raise CheckpointFormatError(f"config has normalizer {config.normalizer!r} but "
                                        f"normalizer={normalizer!r} was asked for; pass the same")
        return config, "config given as a GemmaConfig"
    if isinstance(config, (str, os.PathLike)):
        config_path = os.fspath(config)
        hint = "config= names a Hugging Face config.json"
        return read_config_json(config_path, normalizer, hint), f"config from {config_path}"
    raise CheckpointFormatError(f"config must be a path to a config.json or a GemmaConfig, got "
                                f"{type(config).__name__}")


def read_config_json(config_path, normalizer, hint):
    """GemmaConfig from a Hugging Face config.json; `hint` says where the file should be."""
    try:
        with open(config_path, "rb") as f:
            hf_config = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigNotFoundError(f"{config_path}: missing; {hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{config_path}: is a directory; {hint}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{config_path}: not valid JSON ({e})") from None
    return config_from_hf(hf_config, source=config_path, normalizer=normalizer)


def match_preset(shapes, expected_shapes, source, normalizer="exact"):
    """(preset GemmaConfig, description) whose tensor shapes equal `shapes` ({name: shape}).

    expected_shapes(config) -> {name: shape} in the checkpoint's own naming. Tried: gemma-2b and
    gemma-7b, each with 256000 and with 256128 embedding rows. Tensors that are not weights
    (scalers, buffers) are not compared.
    """
    for preset_name, preset in PRESETS.items():
        for vocab in (preset().vocab_size, PADDED_VOCAB):
            config = preset(vocab_size=vocab, normalizer=normalizer)
            expected = expected_shapes(config)
            extra = [n for n in shapes if n.endswith(".weight") and n not in expected]
            if not extra and all(tuple(shapes.get(n, ())) == s for n, s in expected.items()):
                rows = f" with {PADDED_VOCAB} embedding rows" if vocab == PADDED_VOCAB else ""
                return config, f"config matched the {preset_name} preset{rows} by tensor shapes"
    raise CheckpointFormatError(f"{source}: no config given, and the tensor shapes match neither "
                                f"the gemma-2b nor the gemma-7b preset (found "
                                f"{_shape_summary(shapes, expected_shapes)}); pass config= "
                                f"(a config.json path or a GemmaConfig)")


def _shape_summary(shapes, expected_shapes):
    """The global tensors' and layer 0's shapes, and the number of layers, of a checkpoint."""
    layers = {n.split(".")[2] for n in shapes if n.startswith("model.layers.")}
    names = [n for n in expected_shapes(gemma_2b()) if ".layers." not in n or ".layers.0." in n]
    found = [f"{n} {tuple(shapes[n])}" for n in names if n in shapes]
    return f"{len(layers)} layers; " + ", ".join(found)


# ----------------------------------------------------------------------------------------------
# The readers


def read_hf_directory(directory, given, normalizer):
    """A Hugging Face checkpoint directory: config.json and safetensors."""
    if given is None:
        config_path = os.path.join(directory, "config.json")
        hint = "a Hugging Face checkpoint directory has config.json beside its weights"
        config = read_config_json(config_path, normalizer, hint)
        source = f"config from {config_path}"
    else:
        config, source = given
    tensors = safetensors.read_checkpoint(directory)
    return config, tensors, f"Hugging Face safetensors in {directory}; {source}"


def read_ckpt(path, given, normalizer):
    """A gemma_pytorch .ckpt: its state dict, a config, and the Hugging Face names and layout."""
    state = pytorch.read_state_dict(path)
    if given is None:
        shapes = {name: tensor.shape for name, tensor in state.items()}
        given = match_preset(shapes, pytorch.expected_shapes, path, normalizer)
    config, source = given
    tensors = pytorch.to_hf(state, config, path, source)
    quantized = any(t.dtype == np.int8 for t in state.values())
    kind = "int8 weights with per-row scales" if quantized else "float weights"
    return config, tensors, f"gemma_pytorch checkpoint {path} ({kind}); {source}"


def read_with_module(kind, path, given, normalizer):
    """GGUF (formats/gguf.py) or Orbax (formats/flax.py): read(path) -> (HF config dict, tensors)."""
    module_name, title = {"gguf": ("gguf", "GGUF file"), "orbax": ("flax", "Orbax checkpoint")}[kind]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as e:
        raise CheckpointFormatError(f"{path}: reading this {title} needs minigemma.formats."
                                    f"{module_name}, which could not be imported ({e})") from None
    hf_config, tensors = module.read(path)
    if given is None:
        given = config_from_hf(hf_config, source=path, normalizer=normalizer), f"config from {path}"
    config, source = given
    return config, tensors, f"{title} {path}; {source}"
