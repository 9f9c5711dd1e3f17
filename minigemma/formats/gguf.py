"""Read GGUF files (llama.cpp's format) of Gemma 1, 2 and 3: hyperparameters, weights, tokenizer.

A GGUF file is typed key/value metadata (hyperparameters under "gemma.", "gemma2." or "gemma3.",
the SentencePiece vocabulary under "tokenizer.ggml."), a table of tensors, then their data
(`GGUFFile` below reads the header). The `gguf` package, llama.cpp's own Python package (an
optional extra: pip install minigemma[gguf]), supplies the block sizes and the dequantizers of the
quantized types.

llama.cpp's converter (convert_hf_to_gguf.py; conversion/gemma.py, classes GemmaModel,
Gemma2Model, Gemma3Model) writes a Hugging Face checkpoint with three changes, each undone here:
  - names: blk.{i}.attn_q.weight is model.layers.{i}.self_attn.q_proj.weight, and so on;
  - dimensions: GGUF lists them innermost first, so HF's [N*H, D] is GGUF's [D, N*H]: the same
    bytes, row-major as HF stores them;
  - RMSNorm weights: every tensor whose name ends in "norm.weight" (Gemma 3: Gemma3Model.norm_shift;
    QK-norms included) is stored as 1 + w (llama.cpp multiplies by the stored weight). They come
    back as the raw w, once (see `raw_norm`).
The tied lm_head is not written (the output layer reads token_embd). Some Gemma 2 and 3
hyperparameters are not written at all; llama.cpp assumes the published values, and so does
`unstored_gemma2` / `unstored_gemma3` below.

F32, F16 and BF16 tensors come back as read-only views of the memory-mapped file (BF16 as uint16
bit patterns). Quantized tensors (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K) stay in their
stored blocks as quant.GGMLBlocks, dequantized a few rows at a time by the gguf package's NumPy
dequantizers, which define their values.

`tokenizer_model_bytes(path)` rebuilds the SentencePiece model from the vocabulary in the file,
for minigemma.Tokenizer.from_model_bytes, so that a GGUF alone is enough to run.
"""

import math
import os
import struct

import numpy as np

from ..checkpoint import expected_shapes
from ..config import GLOBAL, LOCAL, from_hf_config, from_hf_config_v2, local_global_pattern
from ..errors import CheckpointNotFoundError, GGUFError
from ..gemma3 import expected_shapes_v2
from ..model import upcast
from ..quant import GGMLBlocks

# Per architecture ("general.architecture"): its name, the Hugging Face model_type, GGUF tensor
# names -> Hugging Face names ({i} is the layer index), "<architecture>." metadata keys ->
# config.json keys, defaults for keys a file may leave out, and a function adding what the file
# does not store.
ARCHITECTURES = {
    "gemma": {
        "title": "Gemma 1",
        "model_type": "gemma",
        "tensors": {
            "token_embd.weight": "model.embed_tokens.weight",
            "output_norm.weight": "model.norm.weight",
            "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
            "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
            "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
            "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
            "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
            # llama.cpp's ffn_norm is HF's post_attention_layernorm: the norm before the FFN.
            "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
            "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
            "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
            "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
        },
        "config": {
            "embedding_length": "hidden_size",
            "block_count": "num_hidden_layers",
            "attention.head_count": "num_attention_heads",
            "attention.head_count_kv": "num_key_value_heads",
            # H: always written by the converter. llama.cpp's fallback D / N is wrong for 7B.
            "attention.key_length": "head_dim",
            "feed_forward_length": "intermediate_size",
            "context_length": "max_position_embeddings",
            "attention.layer_norm_rms_epsilon": "rms_norm_eps",
            "rope.freq_base": "rope_theta",
        },
        # The converter writes no rope.freq_base for Gemma: llama.cpp's default is 10000.
        "defaults": {"rope_theta": 10000.0},
        "unstored": lambda file, hf_config: hf_config,
        "expected_shapes": lambda hf_config, path: expected_shapes(from_hf_config(hf_config, path)),
    },
}

# What a Gemma 2 or 3 GGUF does not store. llama.cpp's loader assumes Gemma's published values
# (ggml-org/llama.cpp src/llama-model.cpp, the LLM_ARCH_GEMMA2 and LLM_ARCH_GEMMA3 cases of
# load_hparams); transformers' GGUF loader (modeling_gguf_pytorch_utils.py) takes the defaults of
# Gemma2Config / Gemma3TextConfig, the same values except that it keeps query_pre_attn_scalar at
# 256, right only where H = 256 (as in the 270M) and wrong for 27B. The values are those of the
# published config.json files and of google-deepmind/gemma (gemma/gm/nn/_gemma.py).


def query_pre_attn_scalar(hf_config, n_layers_27b):
    """The query scale's scalar (scores x scalar^-0.5): H in every Gemma 2 and 3 except the 27B
    models, which use D / N (Gemma 2 27B: 4608 / 32 = 144; Gemma 3 27B: 5376 / 32 = 168).
    llama.cpp tells 27B by its layer count (46, 62), citing gemma_pytorch's config.py."""
    if hf_config["num_hidden_layers"] == n_layers_27b:
        return hf_config["hidden_size"] // hf_config["num_attention_heads"]
    return hf_config["head_dim"]


def unstored_gemma2(file, hf_config):
    """Gemma 2: local and global layers alternate, the first local (llama.cpp
    set_swa_pattern(2)); RoPE base 10,000 everywhere."""
    n_layers = hf_config["num_hidden_layers"]
    return {**hf_config, "layer_types": list(local_global_pattern(n_layers, 2)),
            "query_pre_attn_scalar": query_pre_attn_scalar(hf_config, n_layers_27b=46)}


def unstored_gemma3(file, hf_config):
    """Gemma 3: five local layers then one global (llama.cpp set_swa_pattern(6); transformers'
    sliding_window_pattern 6) unless the file lists them (attention.sliding_window_pattern);
    local layers with RoPE base 10,000 (llama.cpp rope_freq_base_train_swa; transformers'
    rope_local_base_freq; newer converters write it as rope.freq_base_swa) and no RoPE scaling.
    The global layers' base is rope.freq_base, their linear scaling (4B+: 8) rope.scaling.factor.
    A file without attention.sliding_window has only global layers (the converter leaves it out
    when every layer is global; llama.cpp then turns the window off)."""
    arch, n_layers = "gemma3", hf_config["num_hidden_layers"]
    window = file.metadata.get(f"{arch}.attention.sliding_window")
    pattern = file.metadata.get(f"{arch}.attention.sliding_window_pattern", 6)
    if window is None:
        layer_types = [GLOBAL] * n_layers
        window = hf_config["max_position_embeddings"]  # a window that never applies
    elif isinstance(pattern, list):  # one flag per layer: local (sliding) or not
        layer_types = [LOCAL if local else GLOBAL for local in pattern]
    else:
        layer_types = list(local_global_pattern(n_layers, pattern))
    full = {"rope_type": "default", "rope_theta": hf_config.pop("rope_theta")}
    scaling = file.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        full.update(rope_type="linear",
                    factor=shortest(metadata(file, f"{arch}.rope.scaling.factor")))
    elif scaling != "none":
        raise GGUFError(f"{file.path}: {arch}.rope.scaling.type is {scaling!r}; Gemma 3 uses "
                        f"linear RoPE scaling or none")
    local_base = shortest(file.metadata.get(f"{arch}.rope.freq_base_swa", 10000.0))
    return {**hf_config, "layer_types": layer_types, "sliding_window": window,
            "rope_parameters": {LOCAL: {"rope_type": "default", "rope_theta": local_base},
                                GLOBAL: full},
            "query_pre_attn_scalar": query_pre_attn_scalar(hf_config, n_layers_27b=62),
            # Written only when the checkpoint has one (none of Google's Gemma 3 do).
            "final_logit_softcapping": shortest(
                file.metadata.get(f"{arch}.final_logit_softcapping"))}


# Gemma 2 and 3 (Gemma2ForCausalLM, Gemma3ForCausalLM): Gemma 1's tensors, plus a norm after
# attention and one after the FFN. The names are gguf-py's (constants.py, tensor_mapping.py).
GEMMA2_TENSORS = {
    **{g: hf for g, hf in ARCHITECTURES["gemma"]["tensors"].items()
       if g != "blk.{i}.ffn_norm.weight"},
    # Here HF's post_attention_layernorm really follows attention (llama.cpp: post_attention_norm);
    # the norm before the FFN, Gemma 1's post_attention_layernorm, is pre_feedforward_layernorm.
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
GEMMA2_CONFIG = {**ARCHITECTURES["gemma"]["config"],
                 "attention.sliding_window": "sliding_window"}


def expected_shapes_gemma2_3(hf_config, path):
    return expected_shapes_v2(from_hf_config_v2(hf_config, path))


ARCHITECTURES["gemma2"] = {
    "title": "Gemma 2",
    "model_type": "gemma2",
    "tensors": GEMMA2_TENSORS,
    "config": {**GEMMA2_CONFIG,
               "attn_logit_softcapping": "attn_logit_softcapping",
               "final_logit_softcapping": "final_logit_softcapping"},
    # Gemma2Model writes no rope.freq_base either: 10000 everywhere.
    "defaults": {"rope_theta": 10000.0},
    "unstored": unstored_gemma2,
    "expected_shapes": expected_shapes_gemma2_3,
}
ARCHITECTURES["gemma3"] = {
    "title": "Gemma 3",
    "model_type": "gemma3_text",
    "tensors": {**GEMMA2_TENSORS,
                "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
                "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight"},
    # rope.freq_base is the global layers' base (Gemma3Model writes full_attention's rope_theta).
    "config": {k: v for k, v in GEMMA2_CONFIG.items() if k != "attention.sliding_window"},
    "defaults": {},
    "unstored": unstored_gemma3,
    "expected_shapes": expected_shapes_gemma2_3,
}

FLOAT_TYPES = ("F32", "F16", "BF16")
QUANTIZED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type) = SentencePiece's piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _gguf():
    """The gguf package, imported on first use (it is an optional dependency)."""
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: "
                          "pip install minigemma[gguf]") from None
    return gguf


# ----------------------------------------------------------------------------------------------
# The file (ggml-org/ggml docs/gguf.md), little-endian:
#
#   "GGUF", u32 version (2 or 3), u64 tensor count, u64 metadata count
#   metadata: key (a string: u64 length + UTF-8 bytes), u32 value type, value
#   tensors:  name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 ggml type,
#             u64 offset of its bytes from the start of the data
#   zero padding up to a multiple of general.alignment (32), then the data
#
# gguf.GGUFReader parses the same, but builds NumPy views of every string of the vocabulary:
# about 17 s for Gemma's 256000 pieces on a 2-core machine, where this takes a fraction of a second.

MAX_NESTING = 16  # arrays of arrays deeper than this are damage, not metadata
NUMBERS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}  # GGUF value type -> struct format
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


class GGUFFile:
    """The header of a GGUF file, and the file memory-mapped (read-only) for its tensor data.

    metadata: {key: value} (numbers, strings, lists); tensors: {name: (ggml type id, GGUF dims)}.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointNotFoundError(f"{self.path}: GGUF file not found")
        size = os.path.getsize(self.path)
        self.data = np.memmap(self.path, np.uint8, "r") if size else np.zeros(0, np.uint8)
        self._bytes, self._at = memoryview(self.data), 0
        if bytes(self._take(4, "the magic")) != b"GGUF":
            raise GGUFError(f"{self.path}: does not start with GGUF; not a GGUF file")
        version = self._number("<I", "the version")
        if version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {version}; minigemma reads versions 2 and 3 "
                            f"(a huge number means a big-endian file, which it does not read)")
        n_tensors, n_metadata = self._number("<Q", "the counts"), self._number("<Q", "the counts")
        self.metadata = {}
        for _ in range(n_metadata):
            key = self._string("a metadata key")
            self.metadata[key] = self._value(self._number("<I", key), key)
        self.tensors, self._offsets = {}, {}
        for _ in range(n_tensors):
            name = self._string("a tensor name")
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name} is listed twice; the file is damaged")
            dims = [self._number("<Q", name) for _ in range(self._number("<I", name))]
            self.tensors[name] = (self._number("<I", name), dims)
            self._offsets[name] = self._number("<Q", name)
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment is {alignment!r}; expected a power of 2")
        self._data_start = -(-self._at // alignment) * alignment

    def tensor_bytes(self, name, n_bytes):
        """The n_bytes stored for tensor `name`: a read-only uint8 view of the file."""
        start = self._data_start + self._offsets[name]
        if start + n_bytes > len(self.data):
            raise GGUFError(f"{self.path}: tensor {name} ends at byte {start + n_bytes} but the file "
                            f"has {len(self.data)} bytes; the file is truncated")
        return self.data[start:start + n_bytes]

    def _take(self, n, what):
        if self._at + n > len(self._bytes):
            raise GGUFError(f"{self.path}: the file ends (at byte {len(self._bytes)}) inside its "
                            f"header, reading {what}; the file is truncated or not GGUF")
        self._at += n
        return self._bytes[self._at - n:self._at]

    def _number(self, fmt, what):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt), what))[0]

    def _string(self, what):
        raw = self._take(self._number("<Q", what), what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} is not UTF-8 text; the file is damaged") from None

    def _value(self, value_type, key, depth=0):
        if value_type in NUMBERS:
            return self._number(NUMBERS[value_type], key)
        if value_type == STRING:
            return self._string(key)
        if value_type == ARRAY:
            if depth == MAX_NESTING:
                raise GGUFError(f"{self.path}: metadata {key} nests arrays {MAX_NESTING} deep; "
                                f"the file is damaged")
            item_type, count = self._number("<I", key), self._number("<Q", key)
            if item_type in NUMBERS:  # numbers in one go
                dtype = np.dtype(NUMBERS[item_type])
                return np.frombuffer(self._take(count * dtype.itemsize, key), dtype).tolist()
            return [self._value(item_type, key, depth + 1) for _ in range(count)]
        raise GGUFError(f"{self.path}: metadata {key} has value type {value_type}, which GGUF "
                        f"does not define; the file is damaged")


def metadata(file, key, default=None):
    """The value of a metadata key; `default` when it is absent (an error without a default)."""
    if key in file.metadata:
        return file.metadata[key]
    if default is None:
        raise GGUFError(f"{file.path}: metadata key {key} is missing")
    return default


# ----------------------------------------------------------------------------------------------
# Hyperparameters and weights


def read(path):
    """(config.json-style dict, {Hugging Face name: tensor}) of a Gemma 1, 2 or 3 GGUF file.

    The dict is what minigemma.config.config_from_hf takes (model_type "gemma", "gemma2" or
    "gemma3_text", every hyperparameter spelled out); the tensors follow the Hugging Face
    checkpoint's names and [out, in] layout, RMSNorm weights as the raw w.
    """
    _gguf()  # fail now, not halfway, if the optional package is missing
    file = GGUFFile(path)
    spec = ARCHITECTURES[architecture(file)]
    if "token_embd.weight" not in file.tensors:
        raise GGUFError(f"{file.path}: tensor token_embd.weight (the embedding) is missing")
    dims = file.tensors["token_embd.weight"][1]
    vocab_size = dims[-1] if dims else 0  # GGUF [D, V]: V rows
    hf_config = config_from_metadata(file, spec, vocab_size)
    shapes = spec["expected_shapes"](hf_config, file.path)
    names = tensor_names(spec, hf_config["num_hidden_layers"])
    unexpected = sorted(set(file.tensors) - set(names))
    if unexpected:
        raise GGUFError(f"{file.path}: unexpected tensor {unexpected[0]} (not part of a "
                        f"{spec['title']} GGUF)")
    tensors = {}
    for gguf_name, hf_name in names.items():
        if gguf_name not in file.tensors:
            raise GGUFError(f"{file.path}: tensor {gguf_name} ({hf_name}) is missing")
        tensors[hf_name] = tensor_value(file, gguf_name, hf_name, shapes[hf_name])
    return hf_config, tensors


def architecture(file):
    name = metadata(file, "general.architecture")
    if name not in ARCHITECTURES:
        raise GGUFError(f"{file.path}: general.architecture is {name!r}; minigemma reads GGUF files "
                        f"of the architectures {', '.join(map(repr, ARCHITECTURES))}")
    return name


def config_from_metadata(file, spec, vocab_size):
    """A transformers-style config.json dict from the file's "<architecture>." metadata."""
    arch = metadata(file, "general.architecture")
    hf_config = {"model_type": spec["model_type"], "vocab_size": vocab_size,
                 # GGUF does not store the activation: Gemma's is the tanh approximation of GELU.
                 "hidden_activation": "gelu_pytorch_tanh"}
    for key, hf_key in spec["config"].items():
        hf_config[hf_key] = shortest(metadata(file, f"{arch}.{key}", spec["defaults"].get(hf_key)))
    value_length = metadata(file, f"{arch}.attention.value_length", hf_config["head_dim"])
    if value_length != hf_config["head_dim"]:
        raise GGUFError(f"{file.path}: {arch}.attention.value_length is {value_length} but "
                        f"key_length is {hf_config['head_dim']}; Gemma's keys and values have the "
                        f"same head size")
    return spec["unstored"](file, hf_config)


def shortest(value):
    """A stored float32 as the shortest decimal that reads back as it: 1e-06, not
    9.999999974752427e-07. Other values unchanged."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


def tensor_names(spec, n_layers):
    """{GGUF name: Hugging Face name} of every tensor of an n_layers model."""
    names = {}
    for gguf_name, hf_name in spec["tensors"].items():
        layers = range(n_layers) if "{i}" in gguf_name else [None]
        names.update({gguf_name.format(i=i): hf_name.format(i=i) for i in layers})
    return names


def tensor_value(file, name, hf_name, shape):
    """One stored tensor as the weights contract wants it: a read-only view of the file in its
    stored dtype, GGMLBlocks for a quantized one, or the raw w of an RMSNorm weight."""
    gguf = _gguf()
    type_id, dims = file.tensors[name]
    found = tuple(reversed(dims))  # GGUF dims are innermost first: [D, N*H] is HF's [N*H, D]
    if found != shape:
        raise GGUFError(f"{file.path}: tensor {name} ({hf_name}) has shape {found} (GGUF dims "
                        f"{dims}), expected {shape} for the file's hyperparameters")
    kind = ggml_type_name(type_id)
    if kind not in FLOAT_TYPES + QUANTIZED_TYPES:
        raise GGUFError(f"{file.path}: tensor {name} is stored as {kind}; minigemma reads "
                        f"{', '.join(FLOAT_TYPES + QUANTIZED_TYPES)}")
    if hf_name.endswith("norm.weight") and kind not in FLOAT_TYPES:
        raise GGUFError(f"{file.path}: tensor {name} is an RMSNorm weight stored as {kind}; "
                        f"expected {', '.join(FLOAT_TYPES)}")
    weights_per_block, bytes_per_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    raw = file.tensor_bytes(name, math.prod(shape) // weights_per_block * bytes_per_block)  # exact
    if kind in QUANTIZED_TYPES:
        return GGMLBlocks(raw.reshape(shape[0], -1), type_id)
    array = raw.view({"F32": "<f4", "F16": "<f2", "BF16": "<u2"}[kind]).reshape(shape)
    return raw_norm(array) if hf_name.endswith("norm.weight") else array


def ggml_type_name(type_id):
    """The name of a ggml type id (enum ggml_type), as the gguf package spells it: 12 is Q4_K."""
    try:
        return _gguf().GGMLQuantizationType(type_id).name
    except ValueError:
        return f"an unknown ggml type ({type_id})"


def raw_norm(stored):
    """The raw RMSNorm weight w from the s = 1 + w that llama.cpp's converter stores. [D]

    The converter adds 1 in float32 (a bfloat16 checkpoint is widened to float32 first) and stores
    float32. The model then forms 1 + (s - 1), which is s again whenever s - 1 is exact in float32:
      - for s in [0.5, 2] always (Sterbenz's lemma: s - 1 is representable);
      - for s > 2 too: 1 and s are multiples of the spacing of s, and so is s - 1 < s;
      - for s < 0.5 when s came from a float32 w < -0.5: w's spacing is >= 2^-24, so 1 + w
        needed no rounding and s - 1 = w.
    So the model multiplies by transformers' float32 1 + w bit for bit, even where the converter's
    addition rounded a tiny w away (s - 1 = 0 for w = 1e-8, and 1 + 0 = float32(1 + 1e-8)). Only a
    stored s < 0.5 with bits finer than 2^-24, which no conversion of float32 weights writes, would
    round, by at most 2^-25. (A float16 checkpoint is not widened: the converter's 1 + w is
    rounded to float16 there, which no reader can undo.)
    """
    return upcast(stored) - np.float32(1)


# ----------------------------------------------------------------------------------------------
# The tokenizer


def tokenizer_model_bytes(path):
    """A serialized SentencePiece ModelProto of the vocabulary stored in a GGUF file, laid out as
    Gemma's tokenizer.model: BPE over the stored pieces and scores, byte fallback, no dummy prefix,
    whitespace kept as it is, no normalisation beyond ' ' -> '▁'. SentencePiece does the
    tokenizing; see Tokenizer.from_model_bytes.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_model

    file = GGUFFile(path)
    model_name = metadata(file, "tokenizer.ggml.model")
    if model_name != "llama":
        raise GGUFError(f"{file.path}: tokenizer.ggml.model is {model_name!r}; a Gemma tokenizer is "
                        f"SentencePiece ('llama' in GGUF)")
    pieces = metadata(file, "tokenizer.ggml.tokens")
    scores = metadata(file, "tokenizer.ggml.scores")
    types = metadata(file, "tokenizer.ggml.token_type")
    if not len(pieces) == len(scores) == len(types):
        raise GGUFError(f"{file.path}: tokenizer.ggml.tokens, scores and token_type have "
                        f"{len(pieces)}, {len(scores)} and {len(types)} entries; expected the same")
    keys = {"bos": "bos", "eos": "eos", "pad": "padding", "unk": "unknown"}
    special = {name: metadata(file, f"tokenizer.ggml.{key}_token_id", -1) for name, key in keys.items()}
    if special["unk"] < 0:
        special["unk"] = unknown_id(pieces, types, file.path)
    types = original_piece_types(types, special)

    proto = sp_model.ModelProto()
    for piece, score, piece_type in zip(pieces, scores, types):
        if piece_type == USER_DEFINED:
            # The converter writes spaces in user-defined pieces as " " (llama.cpp matches them
            # in raw text); SentencePiece matches them after ' ' -> '▁'.
            piece = piece.replace(" ", "\u2581")
        proto.pieces.add(piece=piece, score=score, type=piece_type)
    trainer = proto.trainer_spec
    trainer.model_type = sp_model.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = BYTE in types  # characters outside the vocabulary become byte pieces
    for name, i in special.items():
        setattr(trainer, f"{name}_id", i)
        if i >= 0:
            setattr(trainer, f"{name}_piece", pieces[i])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"  # no NFKC: text is only escaped, ' ' -> '▁'
    normalizer.add_dummy_prefix = bool(metadata(file, "tokenizer.ggml.add_space_prefix", False))
    normalizer.remove_extra_whitespaces = False  # runs of spaces and newlines are tokens of their own
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def unknown_id(pieces, types, path):
    """The id of SentencePiece's unknown piece: the one typed UNKNOWN or, as the converter types
    <unk> CONTROL when tokenizer_config.json calls it special (and writes no unknown_token_id),
    the piece <unk> (Gemma's, and SentencePiece's default name)."""
    if UNKNOWN in types:
        return types.index(UNKNOWN)
    if "<unk>" in pieces:
        return pieces.index("<unk>")
    raise GGUFError(f"{path}: the vocabulary has no unknown piece (token type 2, or <unk>); "
                    f"a SentencePiece model needs one")


def original_piece_types(types, special):
    """The SentencePiece piece types of Gemma's tokenizer.model, from those the converter wrote.

    special: {"bos", "eos", "pad", "unk": id}. The converter keeps normal, unknown, control and
    byte pieces, but writes tokenizer.model's user-defined pieces (<start_of_turn>, <unused0>,
    runs of newlines and spaces, HTML tags...; SentencePiece matches them whole in the text) as
    NORMAL, or, when the checkpoint's tokenizer_config.json lists them, as USER_DEFINED or CONTROL
    (<unk> too). Two facts of SentencePiece's trainer restore them: its only control pieces are
    <pad>, <eos> and <bos> (Gemma's file has no other), and user-defined pieces take the ids before
    the byte pieces, which come before every learned (normal) piece.
    """
    types = [int(t) for t in types]
    first_byte = types.index(BYTE) if BYTE in types else 0
    control_ids = {special["bos"], special["eos"], special["pad"]}
    for i, piece_type in enumerate(types):
        if i == special["unk"]:
            types[i] = UNKNOWN
        elif piece_type == NORMAL and i < first_byte:
            types[i] = USER_DEFINED
        elif piece_type == CONTROL and i not in control_ids:
            types[i] = USER_DEFINED
    return types
