"""minigemma's safetensors reader and writer against the `safetensors` package and transformers.

Files are written by the real tools (safetensors.numpy / safetensors.torch save_file, and
transformers' save_pretrained, single-file and sharded); every tensor must come back bit-identical
to what the writer was given (BF16 as its 16-bit patterns, and upcast exactly to what torch's
bfloat16 -> float32 gives), as a read-only view of a memory map of the file, never a copy.
Our own writer (used for the demo and the 2B-shape checkpoints) is checked the other way round:
what it writes, the `safetensors` package reads back bit-identical.
"""

import json
import os

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from minigemma.formats import safetensors as st
from minigemma.model import upcast
from helpers import bits, mapped_file
from hf_peer import TINY, random_gemma

SPECIALS = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-40, 6e-8, 65504.0]  # NaN, infs, zeros, subnormals


def torch_bits(tensor):
    """The stored bit patterns of a torch tensor (bfloat16 included, which NumPy cannot hold)."""
    as_int = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
    return tensor.contiguous().view(as_int).numpy().view(f"<u{tensor.element_size()}")


def numpy_tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "f32.matrix": rng.standard_normal((5, 7)).astype(np.float32),
        "f32.specials": np.array(SPECIALS, np.float32),
        "f16.cube": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "f16.specials": np.array(SPECIALS, np.float16),
        "f32.scalar": np.array(3.5, np.float32),
        "f16.empty": np.zeros((0, 3), np.float16),
    }


def torch_tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "bf16.matrix": torch.randn(6, 5, generator=gen).to(torch.bfloat16),
        "bf16.specials": torch.tensor(SPECIALS).to(torch.bfloat16),
        "f16.vector": torch.randn(9, generator=gen).to(torch.float16),
        "f32.matrix": torch.randn(3, 8, generator=gen),
    }


def test_reads_numpy_writer_bit_identical(tmp_path):
    path = str(tmp_path / "np.safetensors")
    given = numpy_tensors()
    safetensors.numpy.save_file(given, path, metadata={"format": "np", "note": "ignored"})
    ours = st.read(path)
    assert set(ours) == set(given)  # __metadata__ is not a tensor
    for name, array in given.items():
        assert ours[name].dtype == array.dtype and ours[name].shape == array.shape, name
        assert np.array_equal(bits(ours[name]), bits(array)), name


def test_reads_torch_writer_bf16_bits_and_exact_upcast(tmp_path):
    path = str(tmp_path / "pt.safetensors")
    given = torch_tensors()
    safetensors.torch.save_file(given, path, metadata={"format": "pt"})
    ours = st.read(path)
    assert set(ours) == set(given)
    for name, tensor in given.items():
        assert ours[name].shape == tuple(tensor.shape), name
        assert np.array_equal(bits(ours[name]), torch_bits(tensor)), name
        # Widening to float32 is exact: identical bits to torch's own conversion.
        assert np.array_equal(bits(upcast(ours[name])), torch_bits(tensor.float())), name
    assert ours["bf16.matrix"].dtype == np.uint16  # NumPy has no bfloat16: the bit patterns


def test_tensors_are_read_only_views_of_a_memory_map(tmp_path):
    path = str(tmp_path / "np.safetensors")
    safetensors.numpy.save_file(numpy_tensors(), path)
    ours = st.read(path)
    for name, array in ours.items():
        if array.size:  # an empty tensor has no bytes to map
            assert mapped_file(array) == os.path.realpath(path), name
        assert not array.flags.writeable and not array.flags.owndata, name
    with pytest.raises(ValueError, match="read-only"):
        ours["f32.matrix"][0, 0] = 1.0

    # Behaviourally a view, not a copy: bytes changed in the file show through the array.
    header, start = st.read_header(path)
    begin = header["f32.matrix"]["data_offsets"][0]
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, np.float32(123.25).tobytes(), start + begin)
    finally:
        os.close(fd)
    assert ours["f32.matrix"][0, 0] == np.float32(123.25)


def test_metadata_is_ignored(tmp_path):
    path = str(tmp_path / "meta.safetensors")
    safetensors.numpy.save_file({"x": np.ones(3, np.float32)},
                                path, metadata={"format": "pt", "__other__": "{not json"})
    assert list(st.read(path)) == ["x"]


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_reads_save_pretrained_checkpoints(tmp_path, storage, sharded):
    model = random_gemma(TINY["gqa"], seed=3).to(storage)
    model.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "5GB")
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: not saved
    ours = st.read_checkpoint(str(tmp_path))
    assert set(ours) == set(state)
    for name, tensor in state.items():
        assert np.array_equal(bits(ours[name]), torch_bits(tensor)), name
        assert not ours[name].flags.writeable, name

    index = tmp_path / "model.safetensors.index.json"
    if sharded:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert len(set(weight_map.values())) > 1, "max_shard_size did not force several shards"
        for name, array in ours.items():
            assert mapped_file(array) == os.path.realpath(tmp_path / weight_map[name]), name
    else:
        assert not index.exists()
        single = os.path.realpath(tmp_path / "model.safetensors")
        assert {mapped_file(a) for a in ours.values()} == {single}


def test_our_writer_round_trips_through_the_safetensors_package(tmp_path):
    path = str(tmp_path / "ours.safetensors")
    rng = np.random.default_rng(1)
    bf16 = torch_tensors()["bf16.specials"]
    given = {
        "bf16": torch_bits(bf16),                                     # uint16 -> BF16
        "f16": np.array(SPECIALS, np.float16).reshape(2, 4),
        "f32": rng.standard_normal((4, 3)).astype(np.float32),
        "f32.transposed": rng.standard_normal((3, 5)).astype(np.float32).T,  # not C-contiguous
        "f32.scalar": np.array(-2.0, np.float32),
    }
    st.write(path, given, metadata={"format": "pt", "source": "minigemma"})
    theirs = safetensors.torch.load_file(path)
    assert set(theirs) == set(given)
    assert theirs["bf16"].dtype == torch.bfloat16 and theirs["f16"].dtype == torch.float16
    for name, array in given.items():
        assert tuple(theirs[name].shape) == array.shape, name
        assert np.array_equal(torch_bits(theirs[name]), bits(array)), name
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "source": "minigemma"}
    header, start = st.read_header(path)
    assert start % 8 == 0  # data aligned, as the reference writer does


def test_write_refuses_unsupported_dtype_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "out.safetensors"
    st.write(str(path), {"kept": np.ones(2, np.float32)})
    before = path.read_bytes()
    with pytest.raises(st.SafetensorsError,
                       match=r"out.safetensors: cannot write tensor 'x' of dtype float64"):
        st.write(str(path), {"ok": np.ones(2, np.float32), "x": np.ones(2, np.float64)})
    assert path.read_bytes() == before  # the old file is untouched
    assert os.listdir(tmp_path) == ["out.safetensors"]  # no .partial left behind
