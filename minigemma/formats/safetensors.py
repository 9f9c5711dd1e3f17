"""Read (and write) safetensors files with NumPy alone: no torch, no copies.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length n,
n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw little-endian, row-major tensor bytes. Offsets are relative to the end of the header.

Tensors come back as read-only views into a memory map of the file, so a 5 GB checkpoint costs no
memory until its pages are touched. NumPy has no bfloat16: BF16 tensors come back as uint16 arrays
holding the bit patterns (the upper half of a float32); `model.upcast` widens them exactly.
"""

import json
import math
import os
import struct

import numpy as np

from ..errors import CheckpointNotFoundError, SafetensorsError, shown
from ..uninterrupted import held_signals

# safetensors dtype name -> NumPy dtype of the array we hand out
DTYPES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
NAMES = {np.dtype("<u2"): "BF16", np.dtype("<f2"): "F16", np.dtype("<f4"): "F32"}
MAX_HEADER = 100_000_000  # bytes; the official reader's limit (safetensors/src/tensor.rs)


def read_header(path):
    """(header dict, byte offset where the data starts) of one .safetensors file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: file is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER:
            raise SafetensorsError(f"{path}: header length {n} is over the format's limit of "
                                   f"{MAX_HEADER} bytes; the file is damaged or not safetensors")
        if 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} points past the end of the file "
                                   f"({size} bytes); the file is truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeated_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, _RepeatedKey) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise SafetensorsError(f"{path}: header's __metadata__ is not a JSON object")
    return header, 8 + n


class _RepeatedKey(ValueError):
    pass


def _no_repeated_keys(pairs):
    """A JSON object as a dict; a name given twice (which json.loads would silently drop) raises."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _RepeatedKey(f"{key!r} appears twice")
        seen[key] = value
    return seen


def read(path):
    """{name: read-only np.ndarray view into the memory-mapped file} for one .safetensors file.

    Checked as strictly as the official reader (safetensors/src/tensor.rs, Metadata::validate):
    each tensor's bytes are its shape times its dtype size, and the tensors, in offset order, tile
    the data section exactly, from its first byte to the end of the file, without gap or overlap.
    A header length that is off by a few bytes can still parse (the header is padded with spaces);
    the tiling is what catches it, instead of every tensor being read shifted.
    """
    header, start = read_header(path)
    size = os.path.getsize(path)
    entries = {name: _entry(path, name, info) for name, info in header.items()
               if name != "__metadata__"}
    _check_tiling(path, entries, start, size)
    if size > start:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    else:  # no data bytes (only empty tensors): nothing to map
        data = np.zeros(0, np.uint8)
        data.flags.writeable = False
    return {name: data[start + begin:start + end].view(dtype).reshape(shape)
            for name, (dtype, shape, begin, end) in entries.items()}


def _entry(path, name, info):
    """(dtype, shape, begin, end) of one header entry, checked on its own."""
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry "
                               f"{shown(info)}") from None
    if not isinstance(dtype_name, str) or not all(_is_count(n) for n in (*shape, begin, end)):
        raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry "
                               f"{shown(info)} (expected a dtype name, and non-negative "
                               f"integers for the shape and data_offsets)")
    if dtype_name not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r} has dtype {dtype_name}; minigemma reads "
                               f"{', '.join(DTYPES)}")
    dtype = DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize  # Python integers: a huge shape cannot wrap around
    if end - begin != nbytes:
        raise SafetensorsError(f"{path}: tensor {name!r} {dtype_name}{list(shape)} needs {nbytes} "
                               f"bytes but its data_offsets are [{begin}, {end}]")
    return dtype, shape, begin, end


def _check_tiling(path, entries, start, size):
    """The tensors, in offset order, must cover the data section (bytes start..size of the file,
    offsets counted from `start`) exactly once."""
    for name, (_, _, begin, end) in entries.items():
        if start + end > size:
            raise SafetensorsError(f"{path}: tensor {name!r} ends at byte {start + end} but the "
                                   f"file has {size} bytes; the file is truncated")
    data_size, at, previous = size - start, 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin < at:
            raise SafetensorsError(f"{path}: tensors {previous!r} and {name!r} overlap (bytes "
                                   f"[{begin}, {at}) of the data section belong to both)")
        if begin > at:
            after = f"after tensor {previous!r}" if previous else "at the start of the data"
            raise SafetensorsError(f"{path}: bytes [{at}, {begin}) of the data section, {after}, "
                                   f"belong to no tensor; the data_offsets are wrong")
        at, previous = end, name
    if at != data_size:
        raise SafetensorsError(f"{path}: the data section has {data_size} bytes but the tensors "
                               f"cover {at}; the header length (the first 8 bytes) or the "
                               f"data_offsets are wrong, so every tensor would be read shifted")


def _is_count(n):
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def read_checkpoint(directory):
    """All tensors of a Hugging Face checkpoint directory: model.safetensors, or the shards listed
    in model.safetensors.index.json. Returns {name: array}."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
        return _read_sharded(directory, index)
    if os.path.exists(single):
        return read(single)
    raise CheckpointNotFoundError(f"{directory}: no model.safetensors or "
                                  f"model.safetensors.index.json")


def _read_sharded(directory, index):
    weight_map = _read_index(index)
    tensors, found_in = {}, {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(directory, shard)
        if not os.path.isfile(path):
            wanted = sorted(k for k, v in weight_map.items() if v == shard)
            raise CheckpointNotFoundError(f"{path}: shard listed in {index} is missing "
                                          f"(it holds {len(wanted)} tensors, e.g. {wanted[0]})")
        shard_tensors = read(path)
        for name, where in weight_map.items():
            if where == shard and name not in shard_tensors:
                raise SafetensorsError(f"{path}: {index} says it holds {name!r}, but it does not")
        for name in shard_tensors:
            if name in found_in:
                raise SafetensorsError(f"{path}: tensor {name!r} is also in {found_in[name]}; "
                                       f"each tensor belongs to one shard")
            found_in[name] = shard
        tensors.update(shard_tensors)
    return tensors


def _read_index(index):
    """The weight_map {tensor name: shard file name} of a model.safetensors.index.json."""
    try:
        with open(index, "rb") as f:
            weight_map = json.loads(f.read().decode("utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError) as e:
        raise SafetensorsError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SafetensorsError(f"{index}: 'weight_map' must be a non-empty JSON object "
                               f"{{tensor name: shard file}}")
    for name, shard in weight_map.items():
        # A shard is a file beside the index: never a path leading elsewhere.
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise SafetensorsError(f"{index}: tensor {name!r} is said to be in {shard!r}; expected "
                                   f"the name of a shard file in the same directory")
    return weight_map


def write(path, tensors, metadata=None):
    """Write {name: array} to a .safetensors file atomically (a temporary file, then rename).
    uint16 arrays are written as BF16 bit patterns, float16 as F16, float32 as F32."""
    header, offset = {}, 0
    for name, array in tensors.items():
        if array.dtype not in NAMES:
            raise SafetensorsError(f"{path}: cannot write tensor {name!r} of dtype {array.dtype}")
        header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    tmp = path + ".partial"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for array in tensors.values():
                np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tofile(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the name: a crash leaves old or new
        os.replace(tmp, path)
    finally:
        with held_signals():
            if os.path.exists(tmp):
                os.remove(tmp)
