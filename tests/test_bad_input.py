"""Every kind of bad input raises an error naming the file / tensor / argument and what was expected.

Broken checkpoints start from a good one written by transformers' save_pretrained and are damaged
the way real downloads go wrong: a shard missing, a file cut short, a header rewritten, a tensor
dropped or replaced (through the `safetensors` package's own writer), a config.json edited. Every
error is a MinigemmaError (tests/test_errors.py has the rest of issue 12's matrix). At the end,
pickles that would run code if a .ckpt reader trusted them (more are in test_pytorch_ckpt.py).
"""

import copyreg
import json
import os
import pickle
import shlex
import shutil
import struct
import zipfile

import numpy as np
import pytest
import safetensors.numpy
import torch

import minigemma
from minigemma import KVCache
from minigemma.formats import pytorch
from minigemma.formats.safetensors import SafetensorsError
from helpers import raises
from hf_peer import TINY, random_gemma

K_PROJ = "model.layers.1.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """{"single": dir, "sharded": dir}: the mqa tiny model (4 query heads, 1 kv head, H 32),
    float32, max_position_embeddings 16, saved by save_pretrained in one file and in shards."""
    model = random_gemma(dict(TINY["mqa"], max_position_embeddings=16), seed=11)
    out = {}
    for kind, shard_size in (("single", "5GB"), ("sharded", "100KB")):
        out[kind] = tmp_path_factory.mktemp(kind)
        model.save_pretrained(out[kind], max_shard_size=shard_size)
    assert (out["sharded"] / "model.safetensors.index.json").exists()
    return out


@pytest.fixture
def ckpt(good, tmp_path):
    """A private copy of the single-file checkpoint, free to damage."""
    return shutil.copytree(good["single"], tmp_path / "ckpt")


@pytest.fixture
def sharded(good, tmp_path):
    return shutil.copytree(good["sharded"], tmp_path / "sharded")


@pytest.fixture(scope="module")
def model(good):
    return minigemma.load(good["single"])


def rewrite_tensors(path, edit):
    """Load a .safetensors file with the safetensors package, edit the dict, save it back."""
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def rewrite_header(path, edit):
    """Edit the JSON header of a .safetensors file in place, keeping the data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_config(directory, **changes):
    edit_json(directory / "config.json", lambda config: config.update(changes))


# ----------------------------------------------------------------------------------------------
# Checkpoint directory and shards


def test_not_a_directory(tmp_path):
    raises(lambda: minigemma.load(tmp_path / "nowhere"), "nowhere: not a checkpoint directory",
           error=FileNotFoundError)


def test_no_weights(ckpt):
    os.remove(ckpt / "model.safetensors")
    raises(lambda: minigemma.load(ckpt), f"{ckpt}: no model.safetensors or "
                                         f"model.safetensors.index.json")


def test_missing_shard(sharded):
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map[K_PROJ]
    os.remove(sharded / shard)
    raises(lambda: minigemma.load(sharded), f"{sharded / shard}: shard listed in",
           "model.safetensors.index.json is missing", error=minigemma.CheckpointNotFoundError)


def test_shard_lacking_a_tensor_the_index_promises(sharded):
    index = sharded / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    other = next(s for s in weight_map.values() if s != weight_map[K_PROJ])
    edit_json(index, lambda data: data["weight_map"].update({K_PROJ: other}))
    raises(lambda: minigemma.load(sharded), f"{sharded / other}:", f"says it holds '{K_PROJ}'")


def test_index_that_is_not_json(sharded):
    (sharded / "model.safetensors.index.json").write_text("{weight_map: ")
    raises(lambda: minigemma.load(sharded), "model.safetensors.index.json: not a safetensors index")


# ----------------------------------------------------------------------------------------------
# Tensors: missing, misshapen, unexpected, of an unknown dtype


def test_missing_tensor(ckpt):
    rewrite_tensors(ckpt / "model.safetensors", lambda t: t.pop(K_PROJ))
    raises(lambda: minigemma.load(ckpt), f"tensor {K_PROJ} is missing (expected shape (32, 64))")


def test_tensor_with_wrong_shape(ckpt):
    rewrite_tensors(ckpt / "model.safetensors",
                    lambda t: t.update({K_PROJ: np.zeros((64, 64), np.float32)}))
    raises(lambda: minigemma.load(ckpt), f"tensor {K_PROJ} has shape (64, 64), expected (32, 64)",
           "config.json")


def test_unexpected_tensor(ckpt):
    bias = {"model.layers.0.self_attn.q_proj.bias": np.zeros(128, np.float32)}
    rewrite_tensors(ckpt / "model.safetensors", lambda t: t.update(bias))
    raises(lambda: minigemma.load(ckpt), "unexpected tensor model.layers.0.self_attn.q_proj.bias")


@pytest.mark.parametrize("dtype, name", [(np.float64, "F64"), (np.int8, "I8")])
def test_unknown_dtype(ckpt, dtype, name):
    path = ckpt / "model.safetensors"
    rewrite_tensors(path, lambda t: t.update({K_PROJ: t[K_PROJ].astype(dtype)}))
    raises(lambda: minigemma.load(ckpt), f"{path}: tensor '{K_PROJ}' has dtype {name}; "
                                         f"minigemma reads BF16, F16, F32", error=SafetensorsError)


# ----------------------------------------------------------------------------------------------
# Broken files: truncated, header not JSON or past the end, offsets that do not fit the shape


@pytest.mark.parametrize("keep", [4, 100, "half", -1])
def test_truncated_file(ckpt, keep):
    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    keep = {"half": len(raw) // 2}.get(keep, keep) % len(raw)
    path.write_bytes(raw[:keep])
    what = ("too short for a safetensors header" if keep < 8 else
            "points past the end of the file" if keep < 8 + header_length else
            "the file is truncated")
    raises(lambda: minigemma.load(ckpt), f"{path}:", what, error=SafetensorsError)


def test_header_not_json(ckpt):
    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[:8] + b"<html>" + raw[14:])  # same length, JSON broken
    raises(lambda: minigemma.load(ckpt), f"{path}: header is not valid JSON", error=SafetensorsError)


def test_header_not_an_object(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    raises(lambda: minigemma.load(ckpt), f"{path}: header is not a JSON object",
           error=SafetensorsError)


def test_header_length_past_the_end(ckpt):
    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    raises(lambda: minigemma.load(ckpt), f"{path}: header length {len(raw)} points past the end "
                                         f"of the file ({len(raw)} bytes)", error=SafetensorsError)


def test_data_offsets_inconsistent_with_shape(ckpt):
    path = ckpt / "model.safetensors"
    rewrite_header(path, lambda h: h[K_PROJ].update(shape=[16, 64]))  # offsets still span 32x64
    raises(lambda: minigemma.load(ckpt), f"{path}: tensor '{K_PROJ}' F32[16, 64] needs 4096 bytes "
                                         f"but its data_offsets are", error=SafetensorsError)


def test_data_offsets_past_the_end(ckpt):
    path = ckpt / "model.safetensors"
    size = os.path.getsize(path)
    rewrite_header(path, lambda h: h[K_PROJ].update(data_offsets=[size, size + 32 * 64 * 4]))
    raises(lambda: minigemma.load(ckpt), f"{path}: tensor '{K_PROJ}' ends at byte",
           "the file is truncated", error=SafetensorsError)


@pytest.mark.parametrize("entry", [{"dtype": "F32", "shape": [32, 64]},
                                   {"dtype": "F32", "shape": [32, -64], "data_offsets": [0, 8192]},
                                   {"dtype": "F32", "shape": "32x64", "data_offsets": [0, 8192]},
                                   "F32"])
def test_malformed_header_entry(ckpt, entry):
    path = ckpt / "model.safetensors"
    rewrite_header(path, lambda h: h.update({K_PROJ: entry}))
    raises(lambda: minigemma.load(ckpt), f"{path}: tensor '{K_PROJ}' has a malformed header entry",
           error=SafetensorsError)


# ----------------------------------------------------------------------------------------------
# config.json: missing, not JSON, disagreeing with the tensors


def test_missing_config(ckpt):
    os.remove(ckpt / "config.json")
    raises(lambda: minigemma.load(ckpt), f"{ckpt / 'config.json'}: missing", error=FileNotFoundError)


@pytest.mark.parametrize("text", ['{"vocab_size": 512,', "", "[1, 2]"])
def test_config_not_a_json_object(ckpt, text):
    (ckpt / "config.json").write_text(text)
    raises(lambda: minigemma.load(ckpt), f"{ckpt / 'config.json'}:")


def test_config_missing_a_key(ckpt):
    edit_json(ckpt / "config.json", lambda config: config.pop("hidden_size"))
    raises(lambda: minigemma.load(ckpt), f"{ckpt / 'config.json'}: missing key 'hidden_size'")


@pytest.mark.parametrize("key, value, fragment", [
    ("num_attention_heads", "4", "n_heads must be a positive integer, got '4'"),
    ("num_key_value_heads", 3, "n_heads (4) must be a multiple of n_kv_heads (3)"),
    ("rms_norm_eps", None, "norm_eps must be a positive number, got None"),
])
def test_config_with_an_invalid_value(ckpt, key, value, fragment):
    edit_config(ckpt, **{key: value})
    raises(lambda: minigemma.load(ckpt), f"{ckpt / 'config.json'}: config: {fragment}")


@pytest.mark.parametrize("changes, fragment", [
    (dict(num_key_value_heads=2), "self_attn.k_proj.weight has shape (32, 64), expected (64, 64)"),
    (dict(head_dim=16), "self_attn.q_proj.weight has shape (128, 64), expected (64, 64)"),
    (dict(vocab_size=500), "model.embed_tokens.weight has shape (512, 64), expected (500, 64)"),
    (dict(intermediate_size=100), "mlp.gate_proj.weight has shape (128, 64), expected (100, 64)"),
    (dict(num_hidden_layers=3), "tensor model.layers.2.input_layernorm.weight is missing"),
    (dict(num_hidden_layers=1), "unexpected tensor model.layers.1."),
])
def test_config_disagreeing_with_the_tensors(ckpt, changes, fragment):
    edit_config(ckpt, **changes)
    raises(lambda: minigemma.load(ckpt), f"{ckpt}: ", fragment)


def test_bad_load_arguments(good):
    raises(lambda: minigemma.load(good["single"], normalizer="sqrt"),
           "normalizer must be 'exact' or 'bf16', got 'sqrt'")
    raises(lambda: minigemma.load(good["single"], dtype=np.float16),
           "dtype must be float32 or float64, got float16")


# ----------------------------------------------------------------------------------------------
# Token ids, prompt length and caches


@pytest.mark.parametrize("ids, fragment", [
    ([2, -1, 5], "token_ids: id -1 is out of range; the vocabulary has ids 0..511"),
    ([2, 512], "token_ids: id 512 is out of range; the vocabulary has ids 0..511"),
    (np.array([2, 3], np.uint64) + 10**6, "token_ids: id 1000002 is out of range"),
    ([[2, 3], [4, 5]], "token_ids must be a 1-D array of integers, got shape (2, 2) dtype int64"),
    ([2.0, 3.0], "token_ids must be a 1-D array of integers, got shape (2,) dtype float64"),
    (np.int64(2), "token_ids must be a 1-D array of integers, got shape () dtype int64"),
    ([[2, 3], [4]], "token_ids must be a 1-D array of integers, got a ragged list"),
    ("hello", "token_ids must be a 1-D array of integers, got shape () dtype <U5"),
    ([], "token_ids is empty; a prompt needs at least one token"),
    (np.zeros(0, np.int32), "token_ids is empty"),
])
def test_bad_token_ids(model, ids, fragment):
    raises(lambda: model.forward(ids), fragment)


def test_prompt_longer_than_max_positions(model):
    assert model.config.max_positions == 16
    model.forward(np.arange(2, 18))  # exactly 16 is fine
    raises(lambda: model.forward(np.arange(2, 19)),
           "token_ids: 17 tokens exceed the model's max positions (16)")
    # Through a cache built by hand with room for more positions than the model has.
    cache = KVCache(n_layers=2, max_len=32, n_kv_heads=1, head_dim=32, dtype=np.float32)
    model.forward(np.arange(2, 12), cache)
    raises(lambda: model.forward(np.arange(2, 9), cache),
           "token_ids: 7 new tokens after 10 cached positions exceed the model's max positions (16)")


def test_cache_longer_than_max_positions_refused(model):
    raises(lambda: model.new_cache(17), "max_len must be in 1..16 (the model's max positions), got 17")
    raises(lambda: model.new_cache(0), "max_len must be in 1..16")


def test_cache_too_short(model):
    cache = model.new_cache(8)
    model.forward(np.arange(2, 8), cache)
    raises(lambda: model.forward(np.arange(2, 5), cache),
           "token_ids: 3 new tokens after 6 cached positions exceed the cache's max_len (8)")
    assert cache.length == 6  # the refused call changed nothing
    model.forward(np.arange(2, 4), cache)


def test_cache_from_another_model(model, good, tiny_checkpoints):
    other = minigemma.load(tiny_checkpoints["mha", "f32"])  # same 2 layers, 4 kv heads of 24
    raises(lambda: model.forward([2, 3], other.new_cache(8)),
           "cache was made for a different model: (layers, kv heads, head_dim, dtype) "
           "(2, 4, 24, 'float32'), expected (2, 1, 32, 'float32'); use model.new_cache()")
    wide = minigemma.load(good["single"], dtype=np.float64)
    raises(lambda: model.forward([2, 3], wide.new_cache(8)),
           "(2, 1, 32, 'float64'), expected (2, 1, 32, 'float32')")
    raises(lambda: model.forward([2, 3], cache={}), "cache was made for a different model: "
           "(layers, kv heads, head_dim, dtype) None")


# ----------------------------------------------------------------------------------------------
# The safetensors reader is as strict as the official one: offsets tile the data exactly


def header_of(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path, header_text, data, n=None):
    """A .safetensors file with the given header bytes (length n, default their length)."""
    path.write_bytes(struct.pack("<Q", len(header_text) if n is None else n) + header_text + data)


def padded(header):
    """Header JSON padded with spaces to a multiple of 8 plus 7: as the official writer pads,
    with room to shorten the stated length by up to 7 bytes and still parse."""
    text = json.dumps(header).encode()
    return text + b" " * (7 + (-len(text) - 7) % 8)


@pytest.mark.parametrize("shift", [-1, -3, -7])
def test_header_length_a_few_bytes_short_is_refused(ckpt, shift):
    """The JSON still parses (its padding is spaces), but every tensor would be read `shift`
    bytes early: the data section is longer than what the tensors cover."""
    path = ckpt / "model.safetensors"
    n, header, data = header_of(path)
    text = padded(header)
    write_raw(path, text, data, n=len(text) + shift)
    assert json.loads(text[:len(text) + shift]) == header  # what a lax reader would accept
    raises(lambda: minigemma.load(ckpt), f"{path}: the data section has {len(data) - shift} bytes "
           f"but the tensors cover {len(data)}", "every tensor would be read shifted",
           error=SafetensorsError)


@pytest.mark.parametrize("shift", [1, 2, 8])
def test_header_length_a_few_bytes_long_is_refused(ckpt, shift):
    path = ckpt / "model.safetensors"
    n, header, data = header_of(path)
    write_raw(path, json.dumps(header).encode(), data, n=len(json.dumps(header)) + shift)
    raises(lambda: minigemma.load(ckpt), f"{path}:", error=SafetensorsError)


def test_overlapping_offsets_are_refused(ckpt):
    path = ckpt / "model.safetensors"
    n, header, data = header_of(path)
    begin, end = header[K_PROJ]["data_offsets"]
    other = next(k for k, v in header.items() if k != "__metadata__"
                 and v["data_offsets"][1] == begin)  # the tensor just before k_proj
    header[K_PROJ]["data_offsets"] = [begin - 4, end - 4]
    write_raw(path, padded(header), data)
    raises(lambda: minigemma.load(ckpt), f"{path}: tensors {other!r} and {K_PROJ!r} overlap",
           error=SafetensorsError)


def test_a_gap_between_tensors_is_refused(ckpt):
    path = ckpt / "model.safetensors"
    n, header, data = header_of(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 4, end + 4]
    write_raw(path, padded(header), data[:begin] + b"\0" * 4 + data[begin:])
    raises(lambda: minigemma.load(ckpt), f"{path}: bytes [{begin}, {begin + 4}) of the data "
           f"section", "belong to no tensor", error=SafetensorsError)


def test_bytes_after_the_last_tensor_are_refused(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 64)
    raises(lambda: minigemma.load(ckpt), f"{path}: the data section has", error=SafetensorsError)


@pytest.mark.parametrize("n", [100_000_001, 2 ** 40, 2 ** 64 - 1])
def test_absurdly_long_header_is_refused(ckpt, n):
    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", n) + raw[8:])
    raises(lambda: minigemma.load(ckpt), f"{path}: header length {n} is over the format's limit",
           error=SafetensorsError)


@pytest.mark.parametrize("text", [b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                  b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
                                  b'{"\xff": 1}', b"\xef\xbb\xbf{}", b"[" * 100_000,
                                  b'{"__metadata__": [1]}',
                                  b'{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}'])
def test_header_json_that_is_odd(tmp_path, text):
    path = tmp_path / "model.safetensors"
    write_raw(path, text, b"\0" * 8)
    with pytest.raises(SafetensorsError, match=str(path)):
        minigemma.formats.safetensors.read(str(path))


def test_a_huge_shape_cannot_wrap_around(tmp_path):
    """2^62 x 4 bytes wraps to 0 in int64: the byte count is taken in Python integers."""
    path = tmp_path / "model.safetensors"
    write_raw(path, b'{"a": {"dtype": "F32", "shape": [4611686018427387904], '
                    b'"data_offsets": [0, 0]}}', b"")
    raises(lambda: minigemma.formats.safetensors.read(str(path)), "needs 18446744073709551616 "
           "bytes but its data_offsets are [0, 0]", error=SafetensorsError)


def interesting_cuts(path):
    """Lengths to truncate a .safetensors file to: inside the length prefix, inside the header,
    at its end, and one byte either side of every tensor's start and end."""
    n, header, _ = header_of(path)
    cuts = set(range(8)) | {9, 8 + n // 2, 8 + n - 1, 8 + n}
    for key, info in header.items():
        if key != "__metadata__":
            for offset in info["data_offsets"]:
                cuts |= {8 + n + offset - 1, 8 + n + offset, 8 + n + offset + 1}
    return sorted(c for c in cuts if c < path.stat().st_size)


def test_a_file_truncated_at_every_interesting_point(ckpt):
    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    cuts = interesting_cuts(path)
    assert len(cuts) > 60
    for cut in cuts:
        path.write_bytes(raw[:cut])
        error = raises(lambda: minigemma.load(ckpt), f"{path}:", error=SafetensorsError)
        n = struct.unpack("<Q", raw[:8])[0]
        if cut > 8 + n:  # inside the data: the message names a tensor that lost bytes
            assert "tensor 'model." in str(error) and "truncated" in str(error), str(error)


def test_a_shard_file_outside_the_directory_is_refused(sharded):
    index = sharded / "model.safetensors.index.json"
    edit_json(index, lambda data: data["weight_map"].update({K_PROJ: "../model.safetensors"}))
    raises(lambda: minigemma.load(sharded), f"{index}: tensor {K_PROJ!r} is said to be in "
           f"'../model.safetensors'", error=SafetensorsError)


def test_a_tensor_in_two_shards_is_refused(sharded):
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    first, second = (sharded / shards[0]), (sharded / shards[1])
    tensors = safetensors.numpy.load_file(second)
    name = next(n for n, shard in weight_map.items() if shard == shards[0])
    tensors[name] = safetensors.numpy.load_file(first)[name]
    safetensors.numpy.save_file(tensors, second, metadata={"format": "pt"})
    raises(lambda: minigemma.load(sharded), f"tensor {name!r} is also in {shards[0]}",
           error=SafetensorsError)


# ----------------------------------------------------------------------------------------------
# Pickles that would run code: refused before anything from them is called. Each payload makes a
# file when pickle.loads runs it (checked first, so that the refusal is not vacuous). The classic
# ones (os.system, builtins.exec, subprocess.Popen, a nested __reduce__) are in
# test_pytorch_ckpt.py; these reach code by other opcodes and other names.


def payloads(marker):
    """{what: (pickle bytes, what the refusal says)}; each pickle creates `marker` when unpickled
    without restriction."""
    command = f"touch {shlex.quote(str(marker))}".encode()
    call = b"(S'" + command + b"'\ntR."  # ... ('touch marker'), then stop
    system = b"cos\nsystem\n" + call
    refused = "data.pkl asks for the global"
    return {
        "protocol 0 GLOBAL": (system, f"{refused} os.system"),
        "protocol 0 INST": (b"(S'" + command + b"'\nios\nsystem\n.", f"{refused} os.system"),
        "getattr of __import__": (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntR"
                                  b"S'system'\ntR" + call, f"{refused} builtins.getattr"),
        # protocol 4 looks dotted names up attribute by attribute: torch._utils imports os
        "a dotted name from an allowed module": (b"\x80\x04ctorch._utils\nos.system\n" + call,
                                                 f"{refused} torch._utils.os.system"),
        "a pickle inside the pickle": (b"c_pickle\nloads\n(C" + bytes([len(system)]) + system
                                       + b"tR.", f"{refused} _pickle.loads"),
        "a copyreg extension code": (b"\x80\x02\x82\xf0" + call,
                                     "data.pkl uses the EXT1 opcode (an object from copyreg's "
                                     "extension registry) at byte 2"),
    }


@pytest.fixture
def extension_code():
    """copyreg extension code 240 naming os.system, as a process that registered it would have."""
    copyreg.add_extension(os.system.__module__, "system", 240)
    yield
    copyreg.remove_extension(os.system.__module__, "system", 240)


def ckpt_with_pickle(path, pickled):
    """A torch.save archive whose data.pkl is replaced by `pickled`."""
    torch.save({"model_state_dict": {"embedder.weight": torch.zeros(4)}}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    entries[next(n for n in entries if n.endswith("/data.pkl"))] = pickled
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, raw in entries.items():
            archive.writestr(name, raw)
    return path


@pytest.mark.parametrize("what", list(payloads("x")))
def test_pickles_that_reach_code_by_other_routes_are_refused(tmp_path, what, extension_code):
    """Including the copyreg extension route: once a code has been unpickled in the process, the
    unpickler takes it from copyreg's cache without asking find_class (which is why the reader
    refuses the EXT opcodes outright)."""
    marker = tmp_path / "pwned"
    pickled, refusal = payloads(marker)[what]
    pickle.loads(pickled)  # without restriction, it runs (and fills copyreg's cache)
    assert marker.exists()
    marker.unlink()
    path = ckpt_with_pickle(tmp_path / "evil.ckpt", pickled)
    raises(lambda: pytorch.read_state_dict(path), f"{path}: {refusal}",
           "refused (nothing from the file was run)", error=minigemma.TorchCheckpointError)
    assert not marker.exists()


def test_a_zip_bomb_data_pkl_is_not_expanded(tmp_path):
    path = tmp_path / "bomb.ckpt"
    torch.save({"model_state_dict": {"embedder.weight": torch.zeros(4)}}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    pkl = next(n for n in entries if n.endswith("/data.pkl"))
    with zipfile.ZipFile(path, "w") as archive:
        for name, raw in entries.items():
            if name == pkl:  # 200 MB of zeros, a few hundred KB compressed
                with archive.open(zipfile.ZipInfo(name), "w", force_zip64=True) as f:
                    for _ in range(200):
                        f.write(bytes(10 ** 6))
            else:
                archive.writestr(name, raw)
    raises(lambda: pytorch.read_state_dict(path), "data.pkl claims 200000000 bytes",
           error=minigemma.TorchCheckpointError)


def test_a_memo_index_that_would_fill_the_memory_is_refused(tmp_path):
    """LONG_BINPUT 2^32 - 16 on an empty memo: the unpickler would grow its memo to 4 billion
    entries (32 GB) before anything could refuse it."""
    path = ckpt_with_pickle(tmp_path / "memo.ckpt", b"\x80\x02}r\xf0\xff\xff\xff.")
    raises(lambda: pytorch.read_state_dict(path), "data.pkl stores memo entry 4294967280 at byte 3 "
           "after 0 entries", error=minigemma.TorchCheckpointError)
