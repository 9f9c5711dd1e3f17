"""Read gemma_pytorch / Kaggle `.ckpt` checkpoints with NumPy alone: torch is never imported.

A `torch.save` file is a zip archive (https://pytorch.org/docs/stable/notes/serialization.html):

    <name>/data.pkl      a pickle of the saved object; each tensor in it is a call of
                         torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                         whose storage is a "persistent id" ('storage', torch.FloatStorage, key, ...)
    <name>/data/<key>    the raw little-endian bytes of that storage, stored uncompressed

A pickle can call any function it names, so data.pkl is read by an unpickler that knows only the
few names a checkpoint of tensors needs, each implemented here with NumPy; any other name is
refused before anything is called. Storages are memory-mapped: a tensor is a view into the file.

gemma_pytorch's names differ from Hugging Face's (`to_hf` maps them, see gemma/model.py in
https://github.com/google/gemma_pytorch): the embedding is `embedder.weight`, and the q, k and v
projections are fused into one `self_attn.qkv_proj.weight` [(N + 2K) * H, D], rows [q | k | v].
The int8 variants ("quant") store each Linear and Embedding `weight` as int8 with a
`weight_scaler` of one float per output row; gemma_pytorch multiplies them out before the matmul
(`weight * weight_scaler.unsqueeze(-1)`), and its logits use that dequantized embedding too.
"""

import _compat_pickle
import collections
import io
import os
import pickle
import pickletools
import struct
import zipfile

import numpy as np

from ..errors import CheckpointNotFoundError, TorchCheckpointError, shown
from ..model import upcast
from ..quant import Int8Rows

# torch storage type (the global named in data.pkl) -> NumPy dtype of the memory-mapped storage.
# NumPy has no bfloat16: its bit patterns come back as uint16, as in safetensors.py.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "CharStorage": np.dtype("i1"),          # int8
    "ComplexFloatStorage": np.dtype("<c8"),  # only gemma_pytorch's freqs_cis buffer, never read
}
WEIGHT_DTYPES = (np.dtype("<f4"), np.dtype("<f2"), np.dtype("<u2"))
IGNORED = {"freqs_cis"}  # the RoPE table gemma_pytorch saves as a buffer; model.py recomputes it

LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature ... name, extra lengths
MAX_PICKLE = 100_000_000  # bytes of data.pkl read at most (a 7B checkpoint's is ~30 KB)
# Opcodes that fetch an object by its number in copyreg's extension registry: the unpickler takes
# a number it has seen before from copyreg's cache, without asking find_class. torch.save never
# writes them.
EXTENSION_OPCODES = {"EXT1", "EXT2", "EXT4"}


def expected_shapes(config):
    """{name: shape} of the tensors of a gemma_pytorch Gemma 1 state dict (freqs_cis aside)."""
    D, N, K = config.d_model, config.n_heads, config.n_kv_heads
    H, F = config.head_dim, config.ffn_dim
    shapes = {"embedder.weight": (config.vocab_size, D), "model.norm.weight": (D,)}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.qkv_proj.weight": ((N + 2 * K) * H, D),  # rows [q | k | v]
            p + "self_attn.o_proj.weight": (D, N * H),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        })
    return shapes


# ----------------------------------------------------------------------------------------------
# Reading the archive


def read_state_dict(path):
    """{gemma_pytorch name: read-only array view into the memory-mapped file} of a .ckpt,
    freqs_cis aside.

    The top level is either the state dict itself or, as gemma_pytorch and Kaggle save it,
    {"model_state_dict": state dict}.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: no such .ckpt file")
    entries, prefix, pickled, byteorder = _read_archive(path)
    if byteorder != b"little":
        raise TorchCheckpointError(f"{path}: saved with byte order {byteorder!r}; minigemma reads "
                                   f"little-endian checkpoints")
    top = _unpickle(path, pickled)
    state = top.get("model_state_dict", top) if isinstance(top, dict) else top
    if not isinstance(state, dict):
        raise TorchCheckpointError(f"{path}: holds a {type(state).__name__}, expected a state dict "
                                   f"({{name: tensor}}, or {{'model_state_dict': state dict}})")
    odd = [name for name in state if not isinstance(name, str)]
    if odd:
        raise TorchCheckpointError(f"{path}: state dict key {shown(odd[0])} is not a "
                                   f"tensor name")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    with open(path, "rb") as f:
        return {name: _tensor(path, name, ref, entries, prefix, data, f)
                for name, ref in state.items() if name not in IGNORED}


def _read_archive(path):
    """({entry name: ZipInfo}, the folder prefix such as "gemma-2b/", data.pkl's bytes, the
    byteorder entry (older torch.save files have none: they are little-endian))."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {info.filename: info for info in archive.infolist()}
            pickles = [n for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise TorchCheckpointError(f"{path}: expected one <name>/data.pkl in the zip "
                                           f"archive as torch.save writes it, found {len(pickles)}")
            prefix = pickles[0][:-len("data.pkl")]
            byteorder = entries.get(prefix + "byteorder")
            return (entries, prefix, _read_entry(path, archive, entries[pickles[0]], MAX_PICKLE),
                    _read_entry(path, archive, byteorder, 16) if byteorder else b"little")
    except TorchCheckpointError:
        raise
    except Exception as e:  # zipfile raises many kinds on a damaged archive: one clear line
        raise TorchCheckpointError(f"{path}: not a readable zip archive ({type(e).__name__}: {e}); "
                                   f"a torch.save checkpoint is a zip file, so this one is "
                                   f"truncated, damaged or not a .ckpt") from None


def _read_entry(path, archive, info, limit):
    """The bytes of a small zip entry, refusing one that claims more than `limit` bytes (a
    compressed entry could otherwise expand to fill memory)."""
    if info.file_size > limit:
        raise TorchCheckpointError(f"{path}: zip entry {info.filename} claims {info.file_size} "
                                   f"bytes; a torch.save checkpoint's is at most {limit}")
    return archive.read(info)


def _entry_offset(path, info, f):
    """Byte offset of an entry's data in the file: after its local header (whose extra field may
    differ from the central directory's, so it is read from the local header itself)."""
    f.seek(info.header_offset)
    raw = f.read(LOCAL_HEADER.size)
    if len(raw) < LOCAL_HEADER.size:
        raise TorchCheckpointError(f"{path}: zip entry {info.filename} starts past the end of the "
                                   f"file; the file is truncated")
    signature, name_length, extra_length = LOCAL_HEADER.unpack(raw)
    if signature != b"PK\x03\x04":
        raise TorchCheckpointError(f"{path}: zip entry {info.filename} has no local file header "
                                   f"at byte {info.header_offset}; the archive is damaged")
    return info.header_offset + LOCAL_HEADER.size + name_length + extra_length


# ----------------------------------------------------------------------------------------------
# The restricted unpickler


# What data.pkl gets back for storages and tensors. They are tuples so that the pickle cannot
# change them after they were checked (its BUILD and APPEND opcodes mutate objects in place).
_StorageType = collections.namedtuple("_StorageType", "name dtype")  # e.g. torch.FloatStorage
_Storage = collections.namedtuple("_Storage", "type key numel")      # zip entry data/<key>
_TensorRef = collections.namedtuple("_TensorRef", "storage offset size stride")


class _Unpickler(pickle.Unpickler):
    """Unpickles data.pkl allowing only the globals that rebuild tensors (implemented below)."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): self.rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self.rebuild_parameter,
            ("collections", "OrderedDict"): collections.OrderedDict,
        }
        if (module, name) in allowed:
            return allowed[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if module == "torch" and name.endswith("Storage"):
            raise TorchCheckpointError(f"{self.path}: data.pkl holds a torch.{name}; minigemma "
                                       f"reads float32, float16, bfloat16 and int8 tensors")
        # Never import what a pickle names: loading a checkpoint must not run code from it.
        # (Protocol 2 pickles spell some globals the Python 2 way: name the one they mean.)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        raise TorchCheckpointError(f"{self.path}: data.pkl asks for the global {module}.{name}, "
                                   f"which a checkpoint of tensors does not need; refused "
                                   f"(nothing from the file was run)")

    def persistent_load(self, pid):
        """('storage', storage type, key, location, numel) -> _Storage."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and _is_count(pid[4])):
            raise TorchCheckpointError(f"{self.path}: data.pkl has a malformed storage reference "
                                       f"{shown(pid)}")
        return _Storage(pid[1], pid[2], pid[4])

    def rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
        """torch._utils._rebuild_tensor_v2, recording where the tensor's elements live."""
        if not (isinstance(storage, _Storage) and _is_count(offset) and _is_counts(size)
                and _is_counts(stride) and len(size) == len(stride)):
            raise TorchCheckpointError(f"{self.path}: data.pkl rebuilds a tensor from malformed "
                                       f"arguments (offset {shown(offset)}, size "
                                       f"{shown(size)}, stride {shown(stride)})")
        return _TensorRef(storage, offset, tuple(size), tuple(stride))  # tuples: copies

    def rebuild_parameter(self, data, requires_grad=False, hooks=None):
        """torch._utils._rebuild_parameter: a Parameter is its tensor."""
        if not isinstance(data, _TensorRef):
            raise TorchCheckpointError(f"{self.path}: data.pkl wraps a non-tensor in a Parameter")
        return data


def _unpickle(path, pickled):
    try:
        _check_opcodes(path, pickled)
        return _Unpickler(io.BytesIO(pickled), path).load()
    except TorchCheckpointError:
        raise
    except Exception as e:  # any malformed pickle: one clear line, not a traceback from pickle
        raise TorchCheckpointError(f"{path}: data.pkl is not a torch.save pickle of tensors "
                                   f"({type(e).__name__}: {e})") from None


def _check_opcodes(path, pickled):
    """Read data.pkl's opcodes (running nothing) and refuse two things torch.save never writes,
    which the unpickler would act on before find_class could refuse anything: an object from
    copyreg's extension registry (taken from its cache, find_class unasked), and a memo index
    beyond the memo so far (the unpickler grows its memo to it: gigabytes for a 4-byte index)."""
    puts = 0
    for opcode, arg, position in pickletools.genops(pickled):
        if opcode.name in EXTENSION_OPCODES:
            raise TorchCheckpointError(f"{path}: data.pkl uses the {opcode.name} opcode (an "
                                       f"object from copyreg's extension registry) at byte "
                                       f"{position}, which torch.save never writes; refused "
                                       f"(nothing from the file was run)")
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if not isinstance(arg, int) or arg > puts:
                raise TorchCheckpointError(f"{path}: data.pkl stores memo entry {arg!r} at byte "
                                           f"{position} after {puts} entries; torch.save numbers "
                                           f"them in order")
            puts += 1
        puts += opcode.name == "MEMOIZE"


def _is_count(n):
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _is_counts(ns):
    return isinstance(ns, (tuple, list)) and all(_is_count(n) for n in ns)


# ----------------------------------------------------------------------------------------------
# Tensors: views into the memory-mapped storages


def _tensor(path, name, ref, entries, prefix, data, f):
    """The array `name` describes: a read-only, strided view into the memory-mapped file."""
    if not isinstance(ref, _TensorRef):
        raise TorchCheckpointError(f"{path}: state dict entry {name!r} is a "
                                   f"{type(ref).__name__}, not a tensor")
    storage = ref.storage
    entry = prefix + "data/" + storage.key
    info = entries.get(entry)
    if info is None:
        raise TorchCheckpointError(f"{path}: tensor {name}: its storage {entry} is not in the "
                                   f"archive")
    if info.compress_type != zipfile.ZIP_STORED:
        raise TorchCheckpointError(f"{path}: tensor {name}: storage {entry} is compressed; "
                                   f"torch.save stores storages uncompressed (so they can be "
                                   f"memory-mapped), this archive was re-zipped")
    dtype = storage.type.dtype
    nbytes = storage.numel * dtype.itemsize
    if info.file_size != nbytes:
        raise TorchCheckpointError(f"{path}: tensor {name}: storage {entry} holds {info.file_size} "
                                   f"bytes, expected {nbytes} ({storage.numel} x torch."
                                   f"{storage.type.name})")
    start = _entry_offset(path, info, f)
    if start + nbytes > len(data):
        raise TorchCheckpointError(f"{path}: tensor {name}: storage {entry} ends at byte "
                                   f"{start + nbytes}, past the end of the file ({len(data)} "
                                   f"bytes); the file is truncated")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if 0 not in ref.size and last >= storage.numel:
        raise TorchCheckpointError(f"{path}: tensor {name} of size {ref.size}, stride {ref.stride}, "
                                   f"offset {ref.offset} reaches past its storage of "
                                   f"{storage.numel} elements")
    elements = data[start:start + nbytes].view(dtype)
    strides = tuple(s * dtype.itemsize if n > 1 else 0 for n, s in zip(ref.size, ref.stride))
    try:
        return np.lib.stride_tricks.as_strided(elements[ref.offset:], ref.size, strides,
                                               writeable=False)
    except (ValueError, OverflowError) as e:  # sizes too large for an empty tensor
        raise TorchCheckpointError(f"{path}: tensor {name} of size {ref.size} cannot be "
                                   f"viewed ({e})") from None


# ----------------------------------------------------------------------------------------------
# gemma_pytorch names and layout -> the Hugging Face contract


def to_hf(state, config, path, config_source):
    """The Hugging Face tensors for a gemma_pytorch state dict, checked against `config`.

    Nothing is copied: q, k and v are row ranges of the fused qkv_proj, and int8 weights become
    Int8Rows over the stored int8 array. `config_source` says where the config came from.
    """
    check_state(state, config, path, config_source)
    weight = lambda name: _weight(state, name)
    N, K, H = config.n_heads, config.n_kv_heads, config.head_dim
    tensors = {"model.embed_tokens.weight": weight("embedder.weight"),
               "model.norm.weight": state["model.norm.weight"]}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        qkv = weight(p + "self_attn.qkv_proj.weight")              # [(N + 2K) * H, D]
        tensors.update({
            p + "input_layernorm.weight": state[p + "input_layernorm.weight"],
            p + "self_attn.q_proj.weight": qkv[:N * H],              # [N*H, D]
            p + "self_attn.k_proj.weight": qkv[N * H:(N + K) * H],   # [K*H, D]
            p + "self_attn.v_proj.weight": qkv[(N + K) * H:],        # [K*H, D]
            p + "self_attn.o_proj.weight": weight(p + "self_attn.o_proj.weight"),
            p + "post_attention_layernorm.weight": state[p + "post_attention_layernorm.weight"],
            p + "mlp.gate_proj.weight": weight(p + "mlp.gate_proj.weight"),
            p + "mlp.up_proj.weight": weight(p + "mlp.up_proj.weight"),
            p + "mlp.down_proj.weight": weight(p + "mlp.down_proj.weight"),
        })
    return tensors


def check_state(state, config, path, config_source):
    """Raise a TorchCheckpointError naming the first tensor missing, misshapen, unexpected, of a
    dtype minigemma does not read, or int8 without its weight_scaler."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in state:
            raise TorchCheckpointError(f"{path}: tensor {name} is missing (expected shape {shape})")
        if state[name].shape != shape:
            raise TorchCheckpointError(f"{path}: tensor {name} has shape {state[name].shape}, "
                                       f"expected {shape} ({config_source})")
        dtype = state[name].dtype
        quantizable = len(shape) == 2  # Linear and Embedding weights; norms stay float
        if dtype not in WEIGHT_DTYPES and not (quantizable and dtype == np.int8):
            raise TorchCheckpointError(f"{path}: tensor {name} has dtype {dtype}; minigemma reads "
                                       f"float32, float16, bfloat16"
                                       + (" and int8 with a weight_scaler" if quantizable else ""))
        scaler = state.get(name + "_scaler")
        if dtype == np.int8 and scaler is None:
            raise TorchCheckpointError(f"{path}: tensor {name} is int8 but {name}_scaler is missing "
                                       f"(one scale per row)")
        if scaler is not None:
            _check_scaler(path, name, state[name], scaler)
    scalers = {name + "_scaler" for name in expected}
    unexpected = sorted(set(state) - set(expected) - scalers)
    if unexpected:
        raise TorchCheckpointError(f"{path}: unexpected tensor {unexpected[0]} (not part of a "
                                   f"gemma_pytorch Gemma 1 checkpoint)")


def _check_scaler(path, name, weight, scaler):
    if weight.dtype != np.int8:
        raise TorchCheckpointError(f"{path}: tensor {name}_scaler comes with a {weight.dtype} "
                                   f"{name}; a scaler belongs to an int8 weight")
    if scaler.shape != (weight.shape[0],) or scaler.dtype not in WEIGHT_DTYPES:
        raise TorchCheckpointError(f"{path}: tensor {name}_scaler has shape {scaler.shape} dtype "
                                   f"{scaler.dtype}, expected ({weight.shape[0]},) floats "
                                   f"(one scale per row of {name})")


def _weight(state, name):
    """A Linear/Embedding weight: the stored float array, or int8 rows x per-row scale."""
    w = state[name]
    if w.dtype != np.int8:
        return w
    # gemma_pytorch: weight * weight_scaler.unsqueeze(-1), formed in float32 (quant.Int8Rows).
    return Int8Rows(w, upcast(state[name + "_scaler"], np.float32))
