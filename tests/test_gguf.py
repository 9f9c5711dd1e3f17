"""minigemma's GGUF reader against transformers, on files written by the real tools.

A tiny seeded random Gemma (N*H = 512 != D = 256, grouped attention, every tensor random, norms
included and some norm entries set to values where 1 + w rounds) is saved by transformers'
save_pretrained and written to GGUF two ways:

  - by llama.cpp's own converter, convert_hf_to_gguf.py (tests/llama_cpp_tools.py), as F32, F16
    and Q8_0 from the float32 checkpoint and BF16 from the bfloat16 one;
  - by the gguf package's writer, every matrix in one quantized type: Q4_0, Q4_1, Q5_0, Q5_1 and
    Q8_0 quantized by gguf.quants.quantize; the K-quants Q2_K..Q6_K, which gguf 0.19 can only
    dequantize, as random blocks with float16 scales set so the weights are O(1/sqrt(fan_in))
    (any bytes are valid K-quant blocks; what they mean is what the dequantizer says).

Each file loads as minigemma.load does and its logits are within 1e-5 relative (max |dlogit| /
max |logit|) of transformers (float32, eager) carrying the same weights: the original weights for
the exact conversions (F32; BF16 against the bfloat16 checkpoint), the float16-rounded weights
for F16, and for quantized files the values of gguf's NumPy dequantizers, which transformers'
own, independently written torch dequantizers (Q4_0, Q4_1, Q8_0, Q2_K..Q6_K) reproduce bit for
bit. transformers 5.24 cannot load a Gemma 1 GGUF itself (its GGUF loader knows gemma2, gemma3,
gemma4 but not gemma), so it is given the weights instead.
"""

import os
import shutil
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import minigemma  # noqa: E402
from minigemma.checkpoint import check_weights  # noqa: E402
from minigemma import quant_kernels  # noqa: E402
from minigemma.config import from_hf_config  # noqa: E402
from minigemma.decode import Decoder  # noqa: E402
from minigemma.formats import gguf as reader  # noqa: E402
from minigemma.model import Gemma  # noqa: E402
from minigemma.quant import GGMLBlocks  # noqa: E402
from hf_peer import load_peer, peer_logits, random_gemma, save_checkpoint  # noqa: E402
from helpers import bits, finish_gguf, mapped_file, write_gguf  # noqa: E402
from llama_cpp_tools import convert_hf_to_gguf  # noqa: E402
from transformers.integrations.gguf import dequant as hf_dequant  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TOKENIZER = os.path.join(REPO, "examples", "tiny-gemma", "tokenizer.model")

# D and F are multiples of 256, so every matrix row is whole K-quant super-blocks (256 weights).
CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=128,
              max_position_embeddings=8192)
SEED = 21
# Norm entries where the converter's float32 1 + w rounds (1e-8, 2^-30), where 1 + w < 0.5 or
# negative, and above 2: the model must still see transformers' float32 1 + w, bit for bit.
TRICKY_NORMS = [1e-8, -2.0 ** -30, -0.75, -1.5, -3.0, 0.25, 2.5, 3.0000002]
PROMPT = [2] + np.random.default_rng(5).integers(4, 512, 15).tolist()
TOLERANCE = 1e-5  # max |dlogit| / max |logit|

# llama.cpp's tensor names (convert_hf_to_gguf.py, MODEL_TENSOR names in gguf-py), restated here
# so that the test does not share the reader's table.
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# Byte offsets of the float16 scales (d, and dmin where there is one) in each 256-weight block
# of the K-quants (the block layouts in gguf/quants.py and ggml-common.h).
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
LEGACY_QUANTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def gguf_name(hf_name):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, i, module = hf_name.split(".", 3)
    return f"blk.{i}.{LAYER_NAMES[module.removesuffix('.weight')]}.weight"


def tiny_model():
    """The seeded random transformers GemmaForCausalLM, float32, with the tricky norm entries."""
    model = random_gemma(CONFIG, seed=SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p[:len(TRICKY_NORMS)] = torch.tensor(TRICKY_NORMS)
    return model


def original_state():
    """{HF name: float32 array} of the tiny model (lm_head is tied: not listed)."""
    state = tiny_model().state_dict()
    return {k: v.numpy().copy() for k, v in state.items() if k != "lm_head.weight"}


def is_matrix(name):
    return not name.endswith("norm.weight")


def peer_with(weights):
    """transformers' model of the tiny config with the given {HF name: float32 array} weights."""
    model = tiny_model()
    with torch.no_grad():
        state = model.state_dict()
        for name, value in weights.items():
            state[name].copy_(torch.from_numpy(np.ascontiguousarray(value, np.float32)))
    return model


def relative_error(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def load_like_checkpoint(path):
    """What minigemma.load does for a GGUF, step by step."""
    hf_config, tensors = reader.read(path)
    config = from_hf_config(hf_config, source=path)
    check_weights(tensors, config, path)
    return Gemma(config, tensors)


# ----------------------------------------------------------------------------------------------
# Files written by llama.cpp's converter


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{"F32" | "F16" | "Q8_0" | "BF16": GGUF path} written by convert_hf_to_gguf.py from
    save_pretrained directories holding the tiny tokenizer.model, and the bf16 directory."""
    model = tiny_model()
    directories = {}
    for storage, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        directory = tmp_path_factory.mktemp(f"hf-{storage}")
        save_checkpoint(model, directory, dtype)
        shutil.copy(TOKENIZER, directory / "tokenizer.model")
        directories[storage] = directory
    out = tmp_path_factory.mktemp("gguf")
    files = {kind: convert_hf_to_gguf(directories[source], str(out / f"tiny-{kind}.gguf"), outtype)
             for kind, source, outtype in (("F32", "f32", "f32"), ("F16", "f32", "f16"),
                                           ("Q8_0", "f32", "q8_0"), ("BF16", "bf16", "bf16"))}
    files["bf16-dir"] = str(directories["bf16"])
    return files


def test_converter_config_is_the_checkpoints(converted):
    hf_config, _ = reader.read(converted["F32"])
    config = from_hf_config(hf_config)
    assert (config.vocab_size, config.d_model, config.n_layers, config.n_heads, config.n_kv_heads,
            config.head_dim, config.ffn_dim) == (512, 256, 2, 4, 2, 128, 512)
    assert (config.max_positions, config.rope_base, config.norm_eps) == (8192, 10000.0, 1e-6)


def test_exact_conversions_keep_the_stored_bytes_memory_mapped(converted):
    """F32 equals the float32 weights and BF16 the bfloat16 checkpoint's, bit for bit; F16 equals
    the float32 weights rounded to float16 by torch. All are read-only views of the file."""
    original = original_state()
    bf16 = tiny_model().to(torch.bfloat16).state_dict()
    for kind, dtype in (("F32", np.float32), ("F16", np.float16), ("BF16", np.uint16)):
        _, tensors = reader.read(converted[kind])
        assert set(tensors) == set(original)
        for name, array in tensors.items():
            if not is_matrix(name):
                continue
            if kind == "BF16":
                expected = bf16[name].view(torch.int16).numpy().view(np.uint16)
            else:
                as_torch = torch.float16 if kind == "F16" else torch.float32
                expected = torch.from_numpy(original[name]).to(as_torch).numpy()
            assert array.dtype == dtype and array.shape == expected.shape, (kind, name)
            assert np.array_equal(bits(array), bits(expected)), (kind, name)
            assert mapped_file(array) == os.path.realpath(converted[kind]), (kind, name)
            assert not array.flags.writeable, (kind, name)


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0"])
def test_norms_give_transformers_one_plus_w_exactly(converted, kind):
    """The file holds 1 + w; minigemma's 1 + (stored - 1) is transformers' float32 1 + w, bits
    and all, also where the converter's addition rounded w away (1e-8) or 1 + w < 0.5."""
    _, tensors = reader.read(converted[kind])
    source = tiny_model().to(torch.bfloat16) if kind == "BF16" else tiny_model()
    for name, w in source.state_dict().items():
        if not is_matrix(name):
            theirs = (1.0 + w.float()).numpy()
            assert tensors[name].dtype == np.float32
            assert np.array_equal(bits(np.float32(1) + tensors[name]), bits(theirs)), (kind, name)


def test_f32_gguf_logits_equal_transformers(converted):
    peer = peer_logits(tiny_model(), PROMPT)
    ours = load_like_checkpoint(converted["F32"]).forward(PROMPT)
    assert relative_error(ours, peer) < TOLERANCE


def test_bf16_gguf_logits_equal_transformers_on_the_bf16_checkpoint(converted):
    peer = peer_logits(load_peer(converted["bf16-dir"]), PROMPT)
    ours = load_like_checkpoint(converted["BF16"]).forward(PROMPT)
    assert relative_error(ours, peer) < TOLERANCE


def test_f16_gguf_logits_equal_transformers_on_the_float16_rounded_weights(converted):
    rounded = {name: w.astype(np.float16).astype(np.float32)
               for name, w in original_state().items() if is_matrix(name)}
    peer = peer_logits(peer_with(rounded), PROMPT)
    ours = load_like_checkpoint(converted["F16"]).forward(PROMPT)
    assert relative_error(ours, peer) < TOLERANCE


def test_q8_0_gguf_from_the_converter(converted):
    """Every matrix (the embedding too) is Q8_0 blocks, memory-mapped; they are the gguf package's
    quantization of the float32 weights, and the logits match transformers carrying their values."""
    _, tensors = reader.read(converted["Q8_0"])
    dequantized = {}
    for name, w in original_state().items():
        if is_matrix(name):
            blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            assert isinstance(tensors[name], GGMLBlocks) and tensors[name].kind == "GGUF Q8_0"
            assert np.array_equal(tensors[name].raw, blocks), name
            assert mapped_file(tensors[name].raw) == os.path.realpath(converted["Q8_0"]), name
            dequantized[name] = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
    peer = peer_logits(peer_with(dequantized), PROMPT)
    ours = load_like_checkpoint(converted["Q8_0"]).forward(PROMPT)
    assert relative_error(ours, peer) < TOLERANCE


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_minigemma_load_reads_a_gguf_file(converted, kind):
    ours = minigemma.load(converted[kind]).forward(PROMPT)
    assert np.array_equal(ours, load_like_checkpoint(converted[kind]).forward(PROMPT))


# ----------------------------------------------------------------------------------------------
# Files written by the gguf package's writer, every matrix in one quantized type


def random_k_quant_blocks(rng, shape, kind):
    """Random K-quant blocks for a [rows, cols] matrix whose dequantized values have about the
    standard deviation of the random model's weights (1/sqrt(cols), 0.1 for the embedding)."""
    ggml_type = gguf.GGMLQuantizationType[kind]
    rows, cols = shape
    n_bytes = gguf.GGML_QUANT_SIZES[ggml_type][1]
    blocks = rng.integers(0, 256, (rows, cols // 256, n_bytes), dtype=np.uint8)

    def set_scales(values):  # float16 values [rows, blocks] into every scale field
        for offset in K_QUANT_SCALES[kind]:
            blocks[:, :, offset:offset + 2] = values.astype(np.float16)[..., None].view(np.uint8)

    set_scales(np.ones(blocks.shape[:2]))
    spread = gguf.quants.dequantize(blocks.reshape(rows, -1), ggml_type).std()
    target = 0.1 if rows == CONFIG["vocab_size"] else cols ** -0.5
    set_scales(target / spread * rng.uniform(0.5, 1.5, blocks.shape[:2]))  # a scale per block
    return blocks.reshape(rows, -1)


def quantized_file(directory, kind):
    """(path, {HF name: dequantized float32 matrix}) of the tiny model with every matrix in
    `kind` and the norms as the converter stores them (1 + w in float32, F32)."""
    ggml_type = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(sum(map(ord, kind)))
    tensors, dequantized = {}, {}
    for name, w in original_state().items():
        if is_matrix(name):
            if kind in K_QUANT_SCALES:
                blocks = random_k_quant_blocks(rng, w.shape, kind)
            else:
                blocks = gguf.quants.quantize(w, ggml_type)
            tensors[gguf_name(name)] = (blocks, ggml_type)
            dequantized[name] = gguf.quants.dequantize(blocks, ggml_type)
        else:
            tensors[gguf_name(name)] = (w + np.float32(1), gguf.GGMLQuantizationType.F32)
    return write_gguf(str(directory / f"tiny-{kind}.gguf"), tensors, CONFIG), dequantized


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    directory = tmp_path_factory.mktemp("quantized")
    return {kind: quantized_file(directory, kind) for kind in LEGACY_QUANTS + tuple(K_QUANT_SCALES)}


@pytest.mark.parametrize("kind", LEGACY_QUANTS + tuple(K_QUANT_SCALES))
def test_quantized_gguf_logits_equal_transformers_on_the_dequantized_weights(quantized, kind):
    path, dequantized = quantized[kind]
    _, tensors = reader.read(path)
    for name, values in dequantized.items():
        assert isinstance(tensors[name], GGMLBlocks) and tensors[name].kind == f"GGUF {kind}"
        assert tensors[name].shape == values.shape, name
        assert mapped_file(tensors[name].raw) == os.path.realpath(path), name
        assert np.array_equal(tensors[name].dequantize(), values), name
    peer = peer_logits(peer_with(dequantized), PROMPT)
    ours = load_like_checkpoint(path).forward(PROMPT)
    assert relative_error(ours, peer) < TOLERANCE


@pytest.mark.parametrize("kind", sorted(quant_kernels.NAMES.values()))
def test_quantized_gguf_decodes_on_the_kernels_as_its_forward(quantized, kind):
    """The decode engine reads the stored blocks (quant_kernels.py): its prefill and steps give
    the logits of the reference forward, which widens each matrix to float32 for BLAS; the
    products are the same, the order of the sums differs."""
    path, _ = quantized[kind]
    model = load_like_checkpoint(path)
    expected = model.forward(PROMPT)                                          # [T, V]
    for reproducible in (False, True):
        decoder = Decoder(model, reproducible)
        assert decoder.on_kernels
        cache = model.new_cache(len(PROMPT))
        rows = [decoder.prefill(PROMPT[:4], cache)]
        rows += [decoder.step(token, cache) for token in PROMPT[4:-1]]
        assert relative_error(np.array(rows), expected[3:-1]) < TOLERANCE, reproducible


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"] + list(K_QUANT_SCALES))
def test_transformers_dequantizers_agree_bit_for_bit(quantized, kind):
    """transformers' torch dequantizers, written independently of gguf's NumPy ones, give the
    same float32 values for every block of every matrix in the file."""
    path, _ = quantized[kind]
    _, tensors = reader.read(path)
    type_id = getattr(hf_dequant, f"GGML_{kind}")
    for name, w in tensors.items():
        if isinstance(w, GGMLBlocks):
            theirs = hf_dequant.dequantize(torch.from_numpy(np.array(w.raw)).reshape(-1), type_id)
            assert np.array_equal(bits(w.dequantize()), bits(theirs.reshape(w.shape).numpy())), name


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0"])
def test_block_rows_slice_and_gather_like_the_whole_matrix(quantized, kind):
    path, _ = quantized[kind]
    _, tensors = reader.read(path)
    w = tensors["model.layers.1.mlp.down_proj.weight"]
    whole = w.dequantize()
    assert np.array_equal(w[3:9].dequantize(), whole[3:9])
    assert w[3:9].shape == (6, whole.shape[1]) and mapped_file(w[3:9].raw) is not None
    assert np.array_equal(w.dequantize([5, 1, 5]), whole[[5, 1, 5]])
    assert w.nbytes == w.raw.nbytes < whole.nbytes


def test_header_parser_agrees_with_the_gguf_package_reader(converted, quantized):
    """minigemma parses the header itself (gguf.GGUFReader takes seconds over a 256000-piece
    vocabulary); on every file it finds what the gguf package's reader finds."""
    files = [converted[k] for k in ("F32", "F16", "BF16", "Q8_0")] + [p for p, _ in quantized.values()]
    for path in files:
        ours, theirs = reader.GGUFFile(path), gguf.GGUFReader(path)
        assert ours.metadata.keys() == {k for k in theirs.fields if not k.startswith("GGUF.")}
        for key, value in ours.metadata.items():
            expected = theirs.fields[key].contents()
            assert value == expected or np.float32(value) == np.float32(expected), (path, key)
        assert list(ours.tensors) == [t.name for t in theirs.tensors]
        for t in theirs.tensors:
            type_id, dims = ours.tensors[t.name]
            assert (type_id, dims) == (int(t.tensor_type), [int(n) for n in t.shape]), (path, t.name)
            raw = ours.tensor_bytes(t.name, int(t.n_bytes))
            assert np.array_equal(raw, np.asarray(t.data).reshape(-1).view(np.uint8)), (path, t.name)


# ----------------------------------------------------------------------------------------------
# 256128 embedding rows (the Flax/Kaggle export's padding) through the converter


def test_256128_row_embedding_loads_as_it_is(tmp_path):
    """A checkpoint with 256128 embedding rows converts (llama.cpp pads the vocabulary with
    [PAD...] pieces) and loads with every row; the 128 padding rows are never scored."""
    config = dict(vocab_size=256128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = random_gemma(config, seed=4)
    save_checkpoint(model, tmp_path / "hf")
    shutil.copy(TOKENIZER, tmp_path / "hf" / "tokenizer.model")
    path = convert_hf_to_gguf(tmp_path / "hf", str(tmp_path / "padded.gguf"), "f16")
    hf_config, tensors = reader.read(path)
    assert hf_config["vocab_size"] == 256128
    assert tensors["model.embed_tokens.weight"].shape == (256128, 32)
    prompt = [2, 255999, 17, 300]
    ours = minigemma.load(path).forward(prompt)
    rounded = {name: w.numpy().astype(np.float16).astype(np.float32)
               for name, w in model.state_dict().items() if w.ndim == 2}
    with torch.no_grad():
        for name, value in rounded.items():
            model.state_dict()[name].copy_(torch.from_numpy(value))
    peer = peer_logits(model, prompt)
    assert ours.shape == (4, 256000) and peer.shape == (4, 256128)
    assert relative_error(ours, peer[:, :256000]) < TOLERANCE


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file and the tensor or key


def raises(call, *fragments, error=ValueError):
    with pytest.raises(error) as e:
        call()
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in {str(e.value)!r}"
    return e.value


def good_tensors():
    """{GGUF name: (array, type)} of the tiny model as F32, as the converter stores it."""
    f32 = gguf.GGMLQuantizationType.F32
    return {gguf_name(name): (w + np.float32(1) if not is_matrix(name) else w, f32)
            for name, w in original_state().items()}


@pytest.mark.parametrize("keep", [100, 0.5, -1000], ids=["in-metadata", "halfway", "last-tensor"])
def test_truncated_file(converted, tmp_path, keep):
    data = open(converted["F32"], "rb").read()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    error = raises(lambda: reader.read(str(path)), str(path), "truncated", error=reader.GGUFError)
    assert isinstance(error, ValueError)
    raises(lambda: minigemma.load(str(path)), str(path), "truncated")


def test_another_architecture(tmp_path):
    path = write_gguf(str(tmp_path / "llama.gguf"), good_tensors(), CONFIG, architecture="llama")
    raises(lambda: reader.read(path), path, "general.architecture is 'llama'", "'gemma'")
    raises(lambda: minigemma.load(path), path, "general.architecture is 'llama'")


def test_misshapen_tensor(tmp_path):
    tensors = good_tensors()
    f32 = gguf.GGMLQuantizationType.F32
    tensors["blk.1.attn_k.weight"] = (np.zeros((128, 256), np.float32), f32)
    path = write_gguf(str(tmp_path / "bad.gguf"), tensors, CONFIG)
    raises(lambda: reader.read(path), path, "blk.1.attn_k.weight",
           "model.layers.1.self_attn.k_proj.weight", "(128, 256)", "expected (256, 256)")


def test_unsupported_quant_type(tmp_path):
    tensors = good_tensors()
    ternary = gguf.GGMLQuantizationType.TQ1_0
    up = tensors["blk.0.ffn_up.weight"][0]
    tensors["blk.0.ffn_up.weight"] = (gguf.quants.quantize(up, ternary), ternary)
    path = write_gguf(str(tmp_path / "ternary.gguf"), tensors, CONFIG)
    raises(lambda: reader.read(path), path, "blk.0.ffn_up.weight", "TQ1_0", "Q4_K")


def test_quantized_norm(tmp_path):
    tensors = good_tensors()
    q8 = gguf.GGMLQuantizationType.Q8_0
    tensors["output_norm.weight"] = (gguf.quants.quantize(tensors["output_norm.weight"][0], q8), q8)
    path = write_gguf(str(tmp_path / "q8norm.gguf"), tensors, CONFIG)
    raises(lambda: reader.read(path), path, "output_norm.weight", "RMSNorm", "Q8_0")


def test_missing_and_unexpected_tensors(tmp_path):
    tensors = good_tensors()
    del tensors["blk.1.ffn_down.weight"]
    path = write_gguf(str(tmp_path / "missing.gguf"), tensors, CONFIG)
    raises(lambda: reader.read(path), path, "blk.1.ffn_down.weight", "missing")

    tensors = good_tensors()
    tensors["blk.0.attn_q_norm.weight"] = (np.ones(128, np.float32), gguf.GGMLQuantizationType.F32)
    path = write_gguf(str(tmp_path / "extra.gguf"), tensors, CONFIG)
    raises(lambda: reader.read(path), path, "unexpected tensor blk.0.attn_q_norm.weight")


def test_missing_metadata_key(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "nokeys.gguf"), "gemma")
    writer.add_embedding_length(256)
    finish_gguf(writer, good_tensors())
    path = str(tmp_path / "nokeys.gguf")
    raises(lambda: reader.read(path), path, "metadata key gemma.block_count is missing")


def test_not_a_gguf_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, 300, np.uint8).tobytes()
    for name, data, fragment in (("text.gguf", b"hello, world", "does not start with GGUF"),
                                 ("version.gguf", b"GGUF" + noise, "GGUF version"),
                                 ("noise.gguf", b"GGUF\x03\x00\x00\x00" + noise, "not GGUF"),
                                 ("empty.gguf", b"", "truncated")):
        (tmp_path / name).write_bytes(data)
        raises(lambda: reader.read(str(tmp_path / name)), str(tmp_path / name), fragment)
    raises(lambda: reader.read(str(tmp_path / "absent.gguf")), "absent.gguf", "not found",
           error=FileNotFoundError)


def test_missing_gguf_package_names_the_extra(monkeypatch, converted):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    raises(lambda: reader.read(converted["F32"]), "pip install minigemma[gguf]", error=ImportError)
