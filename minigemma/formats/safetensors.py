"""Read (and write) safetensors files with NumPy alone: no torch, no copies.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length n,
n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw little-endian, row-major tensor bytes. Offsets are relative to the end of the header.

Tensors come back as read-only views into a memory map of the file, so a 5 GB checkpoint costs no
memory until its pages are touched. NumPy has no bfloat16: BF16 tensors come back as uint16 arrays
holding the bit patterns (the upper half of a float32); `model.upcast` widens them exactly.
"""

import json
import os
import struct

import numpy as np

# safetensors dtype name -> NumPy dtype of the array we hand out
DTYPES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
NAMES = {np.dtype("<u2"): "BF16", np.dtype("<f2"): "F16", np.dtype("<f4"): "F32"}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file or index that cannot be read; the message names the file and tensor."""


def read_header(path):
    """(header dict, byte offset where the data starts) of one .safetensors file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: file is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} points past the end of the file "
                                   f"({size} bytes); the file is truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    return header, 8 + n


def read(path):
    """{name: read-only np.ndarray view into the memory-mapped file} for one .safetensors file."""
    header, start = read_header(path)
    size = os.path.getsize(path)
    if size > start:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    else:  # no data bytes (only empty tensors): nothing to map
        data = np.zeros(0, np.uint8)
        data.flags.writeable = False
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_view(path, name, info, data, start, size)
    return tensors


def _tensor_view(path, name, info, data, start, size):
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
    if not isinstance(dtype_name, str) or not all(_is_count(n) for n in (*shape, begin, end)):
        raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry {info!r} "
                               f"(expected a dtype name, and non-negative integers for the shape "
                               f"and data_offsets)")
    if dtype_name not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r} has dtype {dtype_name}; minigemma reads "
                               f"{', '.join(DTYPES)}")
    dtype = DTYPES[dtype_name]
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != nbytes:
        raise SafetensorsError(f"{path}: tensor {name!r} {dtype_name}{list(shape)} needs {nbytes} "
                               f"bytes but its data_offsets are [{begin}, {end}]")
    if start + end > size:
        raise SafetensorsError(f"{path}: tensor {name!r} ends at byte {start + end} but the file has "
                               f"{size} bytes; the file is truncated")
    return data[start + begin:start + end].view(dtype).reshape(shape)


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
    raise SafetensorsError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def _read_sharded(directory, index):
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SafetensorsError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(directory, shard)
        if not os.path.exists(path):
            wanted = sorted(k for k, v in weight_map.items() if v == shard)
            raise SafetensorsError(f"{path}: shard listed in {index} is missing "
                                   f"(it holds {len(wanted)} tensors, e.g. {wanted[0]})")
        shard_tensors = read(path)
        for name, where in weight_map.items():
            if where == shard and name not in shard_tensors:
                raise SafetensorsError(f"{path}: {index} says it holds {name!r}, but it does not")
        tensors.update(shard_tensors)
    return tensors


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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
