"""minigemma convert: a checkpoint in any format minigemma reads -> a Hugging Face directory or a
GGUF file, lossless where the formats allow.

    convert("gemma-2b.ckpt", "gemma-2b-hf")         config.json, safetensors shards, tokenizer.model
    convert("weights/gemma-2b", "gemma-2b.gguf")    llama.cpp's names, metadata and vocabulary
    convert("gemma-2b.gguf", "out", to="hf")

The source is read by formats.read_checkpoint (Hugging Face safetensors, gemma_pytorch .ckpt,
GGUF, Orbax); the destination's format comes from its name (.gguf, or a directory) or `to`.

What the values become:
  - bfloat16, float16 and float32 tensors are written as stored, bit for bit. A GGUF destination
    may ask for one type for every matrix instead: outtype "f32", "f16", "bf16" or "q8_0"
    (rounded and quantized by the gguf package, as llama.cpp's converter does).
  - Quantized storage (gemma_pytorch int8 with a scale per row, GGUF Q8_0, Q4_K, ...) becomes its
    dequantized float32 values: what minigemma computes with, not the stored bits. The output
    says so in config.json ("minigemma_conversion") or the GGUF key minigemma.conversion.

A Hugging Face directory holds config.json (the keys transformers 5 writes), model.safetensors or,
past max_shard_size, shards model-0000i-of-0000n.safetensors with model.safetensors.index.json,
and tokenizer.model. A GGUF file is what llama.cpp's convert_hf_to_gguf.py writes for Gemma 1
(conversion/gemma.py, class GemmaModel): llama.cpp's tensor names, RMSNorm weights stored as
1 + w in float32, the "gemma." hyperparameters and SentencePiece vocabulary fields.

Nothing half-written: the output goes into a temporary sibling of DST (.DST.partial-*), renamed
to DST when complete and removed on any error or Ctrl-C (and on SIGTERM, which `minigemma convert`
turns into an exit that unwinds the same way). An existing DST is kept unless force=True.
Memory: one tensor at a time (memory-mapped sources cost nothing until read).
"""

import contextlib
import json
import os
import struct
import tempfile
from collections import Counter

import numpy as np

from . import __version__
from .checkpoint import EMBEDDING, check_tied_head, check_weights
from .config import GLOBAL, LOCAL, Gemma3Config
from .errors import (ConvertDestinationError, ConvertError, OutputExistsError,
                     TokenizerNotFoundError)
from .formats import detect_format, read_checkpoint
from .formats.gguf import ARCHITECTURES, GGUFFile, _gguf, tensor_names, tokenizer_model_bytes
from .gemma3 import check_weights_v2, text_weights
from .golden.files import golden_directory
from .model import upcast
from .quant import Quantized
from .uninterrupted import held_signals

FORMATS = ("hf", "gguf")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
MAX_SHARD_SIZE = 5 * 10**9  # bytes per safetensors shard, as the google/gemma-* repositories hold
TOKENIZER = "tokenizer.model"
FORMAT_NAMES = {"safetensors": "Hugging Face safetensors", "ckpt": "gemma_pytorch checkpoint",
                "gguf": "GGUF file", "orbax": "Orbax checkpoint"}
STORED_KINDS = {np.dtype("<u2"): "BF16", np.dtype("<f2"): "F16", np.dtype("<f4"): "F32"}
END_OF_TURN = 107  # <end_of_turn> in Gemma's tokenizer: llama.cpp's end-of-turn (eot) token
UNUSED, NORMAL, UNKNOWN, CONTROL, BYTE = 5, 1, 2, 3, 6  # llama.cpp's token types


def convert(src, dst, *, to=None, outtype=None, config=None, tokenizer=None, progress=None,
            force=False, max_shard_size=MAX_SHARD_SIZE):
    """Write the checkpoint at `src` to `dst`: a Hugging Face directory (to="hf") or a GGUF file
    (to="gguf"); by default ".gguf" names a GGUF file and anything else a directory.

    outtype: None (every tensor as stored; quantized ones as float32) or, for GGUF, the type of
    every matrix: "f32", "f16", "bf16" or "q8_0". config: as for read_checkpoint (needed for a
    .ckpt whose shapes match no preset). tokenizer: a tokenizer.model to use; by default the
    one beside the source, or a GGUF source's own vocabulary. progress: called with a line of
    text per step. force: replace an existing dst. Returns dst.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    to = destination_format(dst, to)
    if outtype is not None and (to != "gguf" or outtype not in OUTTYPES):
        raise ConvertError(f"outtype {outtype!r}: a GGUF destination takes one of "
                           f"{', '.join(OUTTYPES)}; a Hugging Face directory keeps every "
                           f"tensor's stored type")
    check_destination(src, dst, to, force)
    say = progress or (lambda line: None)

    config, tensors, description = read_checkpoint(src, config=config)
    say(f"read {description}")
    tensors = gemma_weights(config, tensors, src, say)
    if to == "gguf" and isinstance(config, Gemma3Config):
        raise ConvertError(f"{src}: {config.name}: minigemma writes GGUF files of Gemma 1 only "
                           f"(convert to a Hugging Face directory, then use llama.cpp's "
                           f"convert_hf_to_gguf.py)")
    kind, where, _ = detect_format(src)
    vocabulary = find_tokenizer(src, kind, where, tokenizer, to, config.vocab_size)
    note = f"converted by minigemma {__version__} from {os.path.basename(os.path.abspath(src))} " \
           f"({FORMAT_NAMES[kind]})"

    if to == "hf":
        with golden_directory(dst, overwrite=force) as staging:
            write_hf_directory(staging, config, tensors, vocabulary, note, max_shard_size, say)
    else:
        name = os.path.splitext(os.path.basename(os.path.abspath(src)))[0]
        with staged_file(dst, force) as staging:
            write_gguf_file(staging, config, tensors, vocabulary, outtype, name, note, say)
    say(f"wrote {dst}")
    return dst


# ----------------------------------------------------------------------------------------------
# Checks made before anything is written


def destination_format(dst, to):
    """"hf" or "gguf": `to` if given, else from dst's name (.gguf: a GGUF file; a name without an
    extension, or with one like "-1.1-2b" that is not all letters: a directory)."""
    if to is not None:
        if to not in FORMATS:
            raise ConvertError(f"to must be 'hf' or 'gguf', got {to!r}")
        return to
    extension = os.path.splitext(os.path.basename(os.path.normpath(dst)))[1]
    if extension.lower() == ".gguf":
        return "gguf"
    if extension[1:].isalpha():
        raise ConvertError(f"{dst}: unknown extension {extension!r}; name a .gguf file or a "
                           f"directory (Hugging Face layout), or say which with --to hf|gguf")
    return "hf"


def check_destination(src, dst, to, force):
    """dst's directory exists; dst does not, unless force and it is of the kind to be written;
    dst neither is nor holds the source."""
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise ConvertDestinationError(f"{dst}: its directory {parent} does not exist (create it first)")
    if not os.path.lexists(dst):
        return
    if not force:
        raise OutputExistsError(f"{dst}: already exists (remove it, or --force to replace it)")
    is_directory, wanted = os.path.isdir(dst), to == "hf"
    if is_directory != wanted:
        raise OutputExistsError(f"{dst}: exists and is a {'directory' if is_directory else 'file'}; "
                              f"--force replaces a {'directory' if wanted else 'file'} only")
    real_dst, real_src = os.path.realpath(dst), os.path.realpath(src)
    if os.path.commonpath([real_dst, real_src]) == real_dst:
        raise ConvertError(f"{dst}: replacing it would delete the source {src}")


def gemma_weights(config, tensors, src, say):
    """{Hugging Face name: tensor} checked against the config, in the order they are written:
    the embedding, layer after layer, the final norm. The tied lm_head is left out, as
    save_pretrained leaves it out."""
    if isinstance(config, Gemma3Config):
        text = text_weights(tensors)
        check_weights_v2(text, config, src)
        if len(text) < len(tensors):
            say(f"{len(tensors) - len(text)} tensors of the vision tower and projector left out: "
                f"the destination is the {config.name} language model")
        tensors = text
    else:
        check_weights(tensors, config, src)
        if "lm_head.weight" in tensors:
            check_tied_head(tensors, src)
    names = sorted((n for n in tensors if n != "lm_head.weight"), key=write_order)
    return {name: tensors[name] for name in names}


def write_order(name):
    """Sort key: the embedding, then the layers in order (each layer's tensors as listed by the
    reader: sorted() is stable), then the final norm."""
    if name == EMBEDDING:
        return (0, 0)
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]))
    return (2, 0)


def group_of(name):
    """The progress group of a tensor: "embedding", "layer i" or "final norm"."""
    if name == EMBEDDING:
        return "embedding"
    if name.startswith("model.layers."):
        return f"layer {name.split('.')[2]}"
    return "final norm"


# ----------------------------------------------------------------------------------------------
# The tokenizer: a tokenizer.model file, or the vocabulary stored in a GGUF source


def find_tokenizer(src, kind, where, given, to, vocab_size):
    """("model", tokenizer.model path), ("gguf", GGUF source path) or None (none found; an error
    for a GGUF destination, which llama.cpp cannot run without a vocabulary). kind and where:
    the source's format and file or directory (formats.detect_format)."""
    if given is not None:
        found = ("model", os.fspath(given))
        if not os.path.isfile(found[1]):
            raise TokenizerNotFoundError(f"{found[1]}: tokenizer not found (--tokenizer names a "
                                    f"SentencePiece tokenizer.model)")
    elif kind == "gguf":
        # The file's own vocabulary, not a tokenizer.model that happens to be beside it.
        has_vocabulary = "tokenizer.ggml.tokens" in GGUFFile(where).metadata
        found, missing = (("gguf", where) if has_vocabulary else None), "it holds no vocabulary"
    else:
        # Beside the weights: in the checkpoint directory; beside a .ckpt file; or one level up
        # from an Orbax directory (Kaggle's Flax archive: tokenizer.model beside 2b/).
        places = [where] if os.path.isdir(where) else []
        if kind in ("ckpt", "orbax"):
            places.append(os.path.dirname(os.path.abspath(where)))
        paths = [os.path.join(p, TOKENIZER) for p in places]
        found = next((("model", p) for p in paths if os.path.isfile(p)), None)
        missing = f"no {TOKENIZER} beside it (looked for {' and '.join(paths)})"
    if found is None and to == "gguf":
        raise TokenizerNotFoundError(f"{src}: {missing}; a GGUF file needs the vocabulary: pass "
                                f"--tokenizer PATH")
    if found is not None:
        check_tokenizer(found, vocab_size)
    return found


def tokenizer_bytes(vocabulary):
    """The serialized SentencePiece model: the file's bytes, or rebuilt from a GGUF vocabulary."""
    kind, path = vocabulary
    if kind == "gguf":
        return tokenizer_model_bytes(path)
    with open(path, "rb") as f:
        return f.read()


def sentencepiece(vocabulary):
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_proto=tokenizer_bytes(vocabulary))
    except RuntimeError as e:  # sentencepiece's "Internal: ... ParseFromArray" and the like
        raise ConvertError(f"{vocabulary[1]}: not a SentencePiece tokenizer.model ({e})") from None


def check_tokenizer(vocabulary, vocab_size):
    """A SentencePiece model with no more pieces than the embedding has rows."""
    pieces = sentencepiece(vocabulary).vocab_size()
    if pieces > vocab_size:
        raise ConvertError(f"{vocabulary[1]}: the tokenizer has {pieces} pieces, more than the "
                           f"{vocab_size} rows of the embedding: not this model's tokenizer")


# ----------------------------------------------------------------------------------------------
# What happens to each tensor


def stored_kind(tensor):
    """"BF16", "F16", "F32", or a quantized format's kind ("int8+scale", "GGUF Q8_0", ...)."""
    return tensor.kind if isinstance(tensor, Quantized) else STORED_KINDS[tensor.dtype]


def how(source, target, norm_plus_one=False):
    """How a value of kind `source` becomes `target`, in words."""
    if norm_plus_one:
        return "stored as 1 + w, llama.cpp's RMSNorm weight"
    if source not in STORED_KINDS.values():
        return "dequantized"
    if source == target:
        return "as stored, bit for bit"
    if target == "F32":
        return "widened exactly"
    return "quantized" if target == "Q8_0" else "rounded"


def summary(changes):
    """One line from a Counter of (source kind, target kind, how)."""
    return "; ".join(f"{n} {source} -> {target} ({way})" if source != target or "1 + w" in way
                     else f"{n} {source} ({way})"
                     for (source, target, way), n in sorted(changes.items()))


def lossy(changes):
    """The part of the summary that changed values or dropped the stored format, for the note."""
    return Counter({key: n for key, n in changes.items()
                    if key[2] in ("dequantized", "rounded", "quantized")})


class Progress:
    """Reports a line when the last tensor of each group (embedding, layer i, final norm) is
    written, with what happened to its tensors."""

    def __init__(self, names, say):
        self.say = say
        self.left = Counter(group_of(n) for n in names)
        self.total, self.done_groups = len(self.left), 0
        self.changes = Counter()

    def done(self, name, change):
        group = group_of(name)
        self.changes[change] += 1
        self.left[group] -= 1
        if self.left[group] == 0:
            self.done_groups += 1
            self.say(f"[{self.done_groups}/{self.total}] {group}: {summary(self.changes)}")
            self.changes = Counter()


# ----------------------------------------------------------------------------------------------
# Hugging Face directory: config.json, safetensors (sharded past max_shard_size), tokenizer.model


def write_hf_directory(directory, config, tensors, vocabulary, note, max_shard_size, say):
    changes = Counter((stored_kind(t), hf_kind(t), how(stored_kind(t), hf_kind(t)))
                      for t in tensors.values())
    say(f"writing a Hugging Face directory: {summary(changes)}")
    if lossy(changes):
        note += f"; {summary(lossy(changes))}"
    files = shard_files(tensors, max_shard_size)
    progress = Progress(tensors, say)
    for file_name, names in files.items():
        write_safetensors(os.path.join(directory, file_name), {n: tensors[n] for n in names},
                          progress)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(hf_nbytes(t) for t in tensors.values())},
                 "weight_map": {n: f for f, names in files.items() for n in names}}
        write_json(os.path.join(directory, "model.safetensors.index.json"), index)
    dtype = Counter(hf_kind(t) for t in tensors.values() if t.ndim == 2).most_common(1)[0][0]
    write_json(os.path.join(directory, "config.json"), hf_config(config, dtype, note))
    if vocabulary is None:
        say(f"no tokenizer found for the source: the directory has no {TOKENIZER} "
            f"(pass --tokenizer)")
    else:
        with open(os.path.join(directory, TOKENIZER), "wb") as f:
            f.write(tokenizer_bytes(vocabulary))
        say(f"{TOKENIZER} from {vocabulary[1]}"
            + (" (rebuilt from the GGUF vocabulary)" if vocabulary[0] == "gguf" else ""))


def hf_kind(tensor):
    """The stored kind written to safetensors: as stored, or F32 for quantized weights."""
    return "F32" if isinstance(tensor, Quantized) else stored_kind(tensor)


def hf_nbytes(tensor):
    return tensor.size * (4 if isinstance(tensor, Quantized) else tensor.dtype.itemsize)


def hf_values(tensor):
    """The array written to safetensors: the stored one (a view), or float32 dequantized."""
    values = tensor.dequantize() if isinstance(tensor, Quantized) else tensor
    return np.ascontiguousarray(values, values.dtype.newbyteorder("<"))


def shard_files(tensors, max_shard_size):
    """{file name: [tensor names]}: model.safetensors, or shards filled in order, the next shard
    begun when a tensor would take this one past max_shard_size (as save_pretrained splits)."""
    shards, size = [[]], 0
    for name, tensor in tensors.items():
        nbytes = hf_nbytes(tensor)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    n = len(shards)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": names for i, names in enumerate(shards)}


def write_safetensors(path, tensors, progress):
    """One .safetensors file (formats/safetensors.py documents the layout), each tensor made and
    written in turn: formats/safetensors.write needs every array in memory at once."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        nbytes = hf_nbytes(tensor)
        header[name] = {"dtype": hf_kind(tensor), "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}  # as save_pretrained writes it
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, tensor in tensors.items():
            hf_values(tensor).tofile(f)
            kind = stored_kind(tensor)
            progress.done(name, (kind, hf_kind(tensor), how(kind, hf_kind(tensor))))


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def hf_config(config, kind, note):
    """config.json for transformers: GemmaForCausalLM, or Gemma2ForCausalLM / Gemma3ForCausalLM,
    with the keys transformers 5 writes (minigemma.config reads them back)."""
    common = {
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_positions,
        "rms_norm_eps": config.norm_eps, "attention_bias": False, "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[kind],
    }
    if not isinstance(config, Gemma3Config):
        return {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", **common,
                "hidden_act": "gelu_pytorch_tanh",
                "rope_parameters": rope(config.rope_base, 1.0), "minigemma_conversion": note}
    local = rope(config.local_rope_base, config.local_rope_factor)
    full = rope(config.global_rope_base, config.global_rope_factor)
    if config.qk_norm:
        architecture, model_type, rope_parameters = "Gemma3ForCausalLM", "gemma3_text", {
            LOCAL: local, GLOBAL: full}
    else:
        if local != full:
            raise ConvertError(f"Gemma 2's config.json has one RoPE for every layer; this config "
                               f"has {local} on local layers and {full} on global ones")
        architecture, model_type, rope_parameters = "Gemma2ForCausalLM", "gemma2", full
    return {"architectures": [architecture], "model_type": model_type, **common,
            "hidden_activation": "gelu_pytorch_tanh", "rope_parameters": rope_parameters,
            "layer_types": list(config.layer_types), "sliding_window": config.sliding_window,
            "query_pre_attn_scalar": config.query_pre_attn_scalar,
            "attn_logit_softcapping": config.attn_softcap,
            "final_logit_softcapping": config.final_softcap, "minigemma_conversion": note}


def rope(base, factor):
    if factor == 1:
        return {"rope_type": "default", "rope_theta": base}
    return {"rope_type": "linear", "factor": factor, "rope_theta": base}


# ----------------------------------------------------------------------------------------------
# GGUF file, as llama.cpp's convert_hf_to_gguf.py writes Gemma 1


def write_gguf_file(path, config, tensors, vocabulary, outtype, name, note, say):
    gguf = _gguf()
    gguf_names = {hf: g for g, hf in tensor_names(ARCHITECTURES["gemma"], config.n_layers).items()}
    types = {hf: gguf_type(hf, t, outtype) for hf, t in tensors.items()}
    changes = Counter(gguf_change(hf, t, types[hf]) for hf, t in tensors.items())
    say(f"writing a GGUF file: {summary(changes)}")
    for hf, t in tensors.items():
        if outtype == "q8_0" and t.ndim == 2 and types[hf].name != "Q8_0":
            say(f"{hf}: rows of {t.shape[1]} weights are not whole Q8_0 blocks of 32: F16, as "
                f"llama.cpp's converter falls back")
    if lossy(changes):
        note += f"; {summary(lossy(changes))}"

    writer = gguf.GGUFWriter(path, "gemma")
    try:
        for hf, t in tensors.items():
            weights_per_block, bytes_per_block = gguf.GGML_QUANT_SIZES[types[hf]]
            writer.add_tensor_info(gguf_names[hf], t.shape, np.float32,
                                   t.size // weights_per_block * bytes_per_block,
                                   raw_dtype=types[hf])
        add_metadata(writer, config, matrix_file_type(tensors, types, outtype), name)
        add_tokenizer_fields(writer, vocabulary, config.vocab_size)
        writer.add_string("minigemma.conversion", note)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        progress = Progress(tensors, say)
        for hf, t in tensors.items():  # in the order of the tensor infos
            writer.write_tensor_data(gguf_values(hf, t, types[hf]))
            progress.done(hf, gguf_change(hf, t, types[hf]))
    finally:
        writer.close()


def is_norm(name):
    return name.endswith("norm.weight")


def gguf_type(name, tensor, outtype):
    """The ggml type a tensor is written as: norms F32 (llama.cpp reads them as F32 only); a
    matrix as stored (F32 when quantized) or in outtype, Q8_0 falling back to F16 where a row is
    not whole blocks of 32, as the converter does."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if is_norm(name):
        return T.F32
    if outtype is None:
        return {"BF16": T.BF16, "F16": T.F16}.get(stored_kind(tensor), T.F32)
    wanted = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[outtype]
    if wanted == T.Q8_0 and tensor.shape[1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0]:
        return T.F16
    return wanted


def gguf_change(name, tensor, ggml_type):
    kind = stored_kind(tensor)
    return kind, ggml_type.name, how(kind, ggml_type.name, norm_plus_one=is_norm(name))


def gguf_values(name, tensor, ggml_type):
    """The bytes of one tensor as stored in the GGUF: the stored array where the type is kept,
    else its float32 values rounded or quantized by gguf.quants (as the converter does)."""
    gguf = _gguf()
    if is_norm(name):
        # llama.cpp multiplies by the stored weight: the converter stores 1 + w, added in float32
        # (bfloat16 widened first). (It adds a float16 checkpoint's 1 + w in float16, which
        # rounds; minigemma widens float16 too, so the file holds transformers' float32 1 + w.)
        return np.float32(1) + upcast(tensor)
    if not isinstance(tensor, Quantized) and stored_kind(tensor) == ggml_type.name:
        return np.ascontiguousarray(tensor)
    values = tensor.dequantize() if isinstance(tensor, Quantized) else upcast(tensor)
    return gguf.quants.quantize(values, ggml_type)


def matrix_file_type(tensors, types, outtype):
    """general.file_type (llama_ftype): outtype's, or the type most matrices are stored as."""
    gguf = _gguf()
    F = gguf.LlamaFileType
    file_types = {"F32": F.ALL_F32, "F16": F.MOSTLY_F16, "BF16": F.MOSTLY_BF16,
                  "Q8_0": F.MOSTLY_Q8_0}
    if outtype is not None:
        return file_types[outtype.upper()]
    most = Counter(types[n].name for n, t in tensors.items() if t.ndim == 2).most_common(1)[0][0]
    return file_types[most]


def add_metadata(writer, config, file_type, name):
    """The general and "gemma." keys, as GemmaModel.set_gguf_parameters writes them."""
    gguf = _gguf()
    writer.add_type("model")
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    writer.add_context_length(config.max_positions)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    if config.rope_base != 10000.0:  # the converter writes none: llama.cpp's default is 10000
        writer.add_rope_freq_base(config.rope_base)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tokenizer_fields(writer, vocabulary, vocab_size):
    """The "tokenizer." keys: copied from a GGUF source, else made from tokenizer.model."""
    if vocabulary[0] == "gguf":
        for key, value in GGUFFile(vocabulary[1]).metadata.items():
            if key.startswith("tokenizer."):
                add_value(writer, key, value)
        return
    for key, value in sentencepiece_fields(sentencepiece(vocabulary), vocab_size):
        add_value(writer, key, value)


def sentencepiece_fields(sp, vocab_size):
    """[(key, value)] of what llama.cpp's converter writes for Gemma's tokenizer.model
    (_set_vocab_sentencepiece, GemmaModel.set_vocab) in a directory without tokenizer_config.json:
    every piece with its score and type (user-defined pieces as NORMAL, as it types them),
    [PAD<id>] pieces up to the embedding's rows, the special ids, eot = <end_of_turn>, and no
    space prefix."""
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i)
                    else UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    fields = [("tokenizer.ggml.model", "llama"), ("tokenizer.ggml.pre", "default"),
              ("tokenizer.ggml.tokens", tokens), ("tokenizer.ggml.scores", scores),
              ("tokenizer.ggml.token_type", types)]
    for key, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("padding", sp.pad_id())):
        if i >= 0:
            fields.append((f"tokenizer.ggml.{key}_token_id", i))
    if END_OF_TURN < vocab_size:
        fields.append(("tokenizer.ggml.eot_token_id", END_OF_TURN))
    fields.append(("tokenizer.ggml.add_space_prefix", False))
    return fields


def add_value(writer, key, value):
    """A metadata value in the GGUF type the converter gives it: ids uint32, scores float32,
    token types int32, flags bool, text string."""
    if isinstance(value, list):
        writer.add_array(key, value)  # items typed by the first: str, float32, int32 or bool
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        (writer.add_uint32 if value >= 0 else writer.add_int32)(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, value)


# ----------------------------------------------------------------------------------------------
# All or nothing


@contextlib.contextmanager
def staged_file(dst, force):
    """golden_directory for one file: yield a temporary sibling of `dst`, moved to `dst` when the
    block completes and removed if it does not."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not force:
        raise OutputExistsError(f"{dst}: already exists (remove it, or --force to replace it)")
    tmp = None
    try:
        with held_signals():  # so that a Ctrl-C finds `tmp` set, and it is removed below
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.partial-",
                                       dir=os.path.dirname(dst))
            os.close(fd)
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is meant to be shared
        os.replace(tmp, dst)
    finally:
        with held_signals():
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
