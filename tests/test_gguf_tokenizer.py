"""The tokenizer rebuilt from a GGUF file's vocabulary against the original tokenizer.model.

Every GGUF here is written by llama.cpp's own converter (convert_hf_to_gguf.py --vocab-only, see
llama_cpp_tools.py) from a directory holding config.json (transformers' save_pretrained) and
the tokenizer.model:

  - the repository's tiny Gemma-layout tokenizers (examples/tiny-gemma and the conformance
    checkpoints; each distinct file once);
  - a larger one trained here that also has Gemma's user-defined runs of newlines and spaces and
    HTML tags (ids 108.. like Gemma's "\\n" 108, "\\n\\n" 109);
  - each of those beside a tokenizer_config.json listing its special and user-defined pieces, as
    the published Gemma repositories have one (transformers 4.x's added_tokens_decoder): the
    converter then writes those pieces with other types, and user-defined spaces as " ";
  - the tiny tokenizer in a checkpoint of 256128 embedding rows (padded with [PAD...] pieces).

The converter writes tokenizer.model's user-defined pieces as NORMAL or CONTROL;
formats.gguf.tokenizer_model_bytes restores them. The rebuilt SentencePiece model must have the
same pieces and types, and give the same ids (SentencePiece's own encode, Tokenizer.encode and
chat_ids) and the same decoded text as the original, on awkward and on random text.
"""

import hashlib
import io
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model
from transformers import GemmaConfig

from minigemma import Tokenizer
from minigemma.formats import gguf as reader
from minigemma.tiny_tokenizer import CORPUS, USER_DEFINED
from llama_cpp_tools import convert_hf_to_gguf

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
REPO_TOKENIZERS = [os.path.join(REPO, "examples", "tiny-gemma", "tokenizer.model")] + [
    os.path.join(REPO, "tests", "conformance", "checkpoints", name, "tokenizer.model")
    for name in sorted(os.listdir(os.path.join(REPO, "tests", "conformance", "checkpoints")))]
# Gemma's user-defined pieces beyond the tiny tokenizer's: runs of newlines and spaces, tabs, HTML.
GEMMA_LIKE_EXTRA = (["\n" * n for n in (1, 2, 3, 4)] + ["\u2581" * n for n in (2, 3, 4, 8)]
                    + ["\t\t", "<table>", "<tr>", "<td>", "</td>", "<s>", "</s>"])
SPECIAL_NAMED = ("<start_of_turn>", "<end_of_turn>")  # special in Gemma's tokenizer_config.json

AWKWARD = [
    "", " ", "  ", "   leading", "trailing   ", "a  b   c    d         e",
    "\n", "\n\n", "\n\n\n\n\n\n\n", "one\ntwo\n\n\nthree\n", "\r\n windows \r\n", " \n \n",
    "\t", "\t\t\tindented", "name\tage\tcity\nAlice\t30\tParis", "\t \t  \t",
    "0", "1234567890", "3.14159, 2,000,000 and 1e-6", "2024-02-21 10:30",
    "The quick brown fox jumps over the lazy dog.", "The model reads the whole prompt at once.",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "今天天气很好，我们去公园散步吧。", "生活的真谛是", "こんにちは、世界！", "안녕하세요!", "Zürich café naïve",
    "😀", "😀😂🎉", "👨\u200d👩\u200d👧 family", "🇫🇷 flag", "e\u0301 (decomposed) é (composed)",
    "<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n", "<start_of_turn><end_of_turn>",
    "<bos><eos><pad><unk>", "<unused0><unused98><mask>[@BOS@]<2mass>", "<start_of_turn",
    "start_of_turn>", "<<start_of_turn>>", "x<start_of_turn>y",
    "<table><tr><td>x</td></tr></table>", "<s>struck</s>", "<html><body><p>Hello</p></body>",
    "\x00 nul", "\x7f\x01\x1b[0m", "\u200b zero width", "\ufeff bom", "ÿ",
    "ﬁ ligature (NFKC would change it)", "Ｆｕｌｌｗｉｄｔｈ", "①②③", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0010fffd",
    "▁ a literal U+2581 ▁▁", "[PAD300] [PAD256000]",
]


def distinct(paths):
    """The paths of distinct files (by content), first of each."""
    seen = {}
    for path in paths:
        seen.setdefault(hashlib.sha256(open(path, "rb").read()).hexdigest(), path)
    return list(seen.values())


def train_gemma_like(path):
    """A 1000-piece tokenizer with the tiny one's settings plus GEMMA_LIKE_EXTRA user-defined."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, model_type="bpe",
        vocab_size=1000, hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
        split_digits=True, split_by_unicode_script=True, split_by_number=True,
        split_by_whitespace=True, treat_whitespace_as_suffix=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=USER_DEFINED + GEMMA_LIKE_EXTRA, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def proto(data):
    model = sp_model.ModelProto()
    model.ParseFromString(data)
    return model


def tokenizer_config(model_path):
    """tokenizer_config.json as transformers 4.x saved it in the Gemma repositories: every control,
    unknown and user-defined piece in added_tokens_decoder; special for the control and unknown
    pieces and the turn markers."""
    pieces = proto(open(model_path, "rb").read()).pieces
    Type = sp_model.ModelProto.SentencePiece
    added = {str(i): {"content": p.piece, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False,
                      "special": p.type != Type.USER_DEFINED or p.piece in SPECIAL_NAMED}
             for i, p in enumerate(pieces)
             if p.type in (Type.CONTROL, Type.UNKNOWN, Type.USER_DEFINED)}
    return {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
            "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
            "tokenizer_class": "GemmaTokenizer", "legacy": False}


def convert(directory, model_path, vocab_size, with_config):
    """The GGUF llama.cpp's converter writes (vocabulary only) from a directory holding config.json
    and the tokenizer.model (and tokenizer_config.json if with_config)."""
    directory.mkdir()
    GemmaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                architectures=["GemmaForCausalLM"]).save_pretrained(directory)
    with open(model_path, "rb") as src, open(directory / "tokenizer.model", "wb") as dst:
        dst.write(src.read())
    if with_config:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(model_path)))
    return convert_hf_to_gguf(directory, str(directory / "vocab.gguf"), vocab_only=True)


CASES = ([(f"repo{i}", path, False) for i, path in enumerate(distinct(REPO_TOKENIZERS))]
         + [("repo0-config", REPO_TOKENIZERS[0], True), ("gemma-like", None, False),
            ("gemma-like-config", None, True), ("repo0-256128-rows", REPO_TOKENIZERS[0], False)])


@pytest.fixture(scope="module", params=CASES, ids=[case[0] for case in CASES])
def pair(request, tmp_path_factory):
    """(original Tokenizer, Tokenizer rebuilt from the GGUF, original bytes, rebuilt bytes)."""
    name, model_path, with_config = request.param
    directory = tmp_path_factory.mktemp(name)
    if model_path is None:
        model_path = train_gemma_like(str(directory / "gemma-like.model"))
    original = open(model_path, "rb").read()
    vocab = 256128 if name.endswith("256128-rows") else len(proto(original).pieces)
    path = convert(directory / "hf", model_path, vocab, with_config)
    rebuilt = reader.tokenizer_model_bytes(path)
    return Tokenizer(model_path), Tokenizer.from_model_bytes(rebuilt, source=path), original, rebuilt


def test_same_pieces_and_types(pair):
    _, _, original, rebuilt = pair
    ours, theirs = proto(rebuilt).pieces, proto(original).pieces
    assert [(p.piece, p.type) for p in ours[:len(theirs)]] == [(p.piece, p.type) for p in theirs]
    # Learned pieces keep their BPE scores (user-defined and control pieces' scores are unused).
    normal = sp_model.ModelProto.SentencePiece.NORMAL
    assert [p.score for p in ours[:len(theirs)] if p.type == normal] == \
           [p.score for p in theirs if p.type == normal]
    # Rows past the tokenizer (256128-row checkpoints) are pieces SentencePiece never produces.
    assert all(p.type == sp_model.ModelProto.SentencePiece.UNUSED for p in ours[len(theirs):])


def test_same_special_ids(pair):
    original, from_gguf, _, _ = pair
    for name in ("pad_id", "eos_id", "bos_id", "unk_id", "start_of_turn_id", "end_of_turn_id"):
        assert getattr(from_gguf, name) == getattr(original, name), name
    assert from_gguf._markers == original._markers


@pytest.mark.parametrize("text", AWKWARD)
def test_same_ids_on_awkward_text(pair, text):
    original, from_gguf, _, _ = pair
    assert from_gguf._sp.encode(text) == original._sp.encode(text)  # SentencePiece itself
    ids = original.encode(text)
    assert from_gguf.encode(text) == ids
    assert from_gguf.decode(ids) == original.decode(ids)


def test_same_chat_ids(pair):
    original, from_gguf, _, _ = pair
    messages = [{"role": "system", "content": "Be brief.\n\n"},
                {"role": "user", "content": "Hi  there!\t<start_of_turn>😀"},
                {"role": "model", "content": "Hello\n\n\n    code"},
                {"role": "user", "content": "生活"}]
    assert from_gguf.chat_ids(messages) == original.chat_ids(messages)


FRAGMENTS = [" ", "  ", "\n", "\n\n", "\t", "<start_of_turn>", "<end_of_turn>", "<bos>", "<unused7>",
             "<table>", "<s>", "▁", "model", "the", "0", "42", "😀", "生活", "é", "e\u0301", "\u200d"]


def random_texts(n, seed=0):
    """n seeded random strings of up to 30 fragments: the ones above, and code points drawn from
    all of Unicode (surrogates excluded), half of them ASCII."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.integers(0, 31)):
            kind = rng.integers(3)
            if kind == 0:
                parts.append(FRAGMENTS[rng.integers(len(FRAGMENTS))])
            else:
                code = int(rng.integers(0x20, 0x7F) if kind == 1 else rng.integers(0, 0x110000))
                parts.append(chr(code) if not 0xD800 <= code < 0xE000 else "?")
        texts.append("".join(parts))
    return texts


def test_same_ids_on_random_text(gemma_like_pair):
    for original, from_gguf in gemma_like_pair:
        for text in random_texts(300):
            assert from_gguf._sp.encode(text) == original._sp.encode(text), text
            assert from_gguf.encode(text) == original.encode(text), text


@pytest.fixture(scope="module")
def gemma_like_pair(tmp_path_factory):
    """(original, rebuilt) Tokenizers of the Gemma-like tokenizer, without and with
    tokenizer_config.json: the cases with the most kinds of pieces."""
    directory = tmp_path_factory.mktemp("random-text")
    model_path = train_gemma_like(str(directory / "gemma-like.model"))
    pairs = []
    for with_config in (False, True):
        path = convert(directory / f"hf-{with_config}", model_path, 1000, with_config)
        rebuilt = Tokenizer.from_model_bytes(reader.tokenizer_model_bytes(path), source=path)
        pairs.append((Tokenizer(model_path), rebuilt))
    return pairs


def test_the_converter_does_write_other_types(tmp_path):
    """What the rebuilding undoes: the converter's token types differ from tokenizer.model's (a
    test that the restoring is needed, so that the tests above cannot pass vacuously)."""
    model_path = train_gemma_like(str(tmp_path / "gemma-like.model"))
    original = [p.type for p in proto(open(model_path, "rb").read()).pieces]
    for with_config in (False, True):
        path = convert(tmp_path / f"hf-{with_config}", model_path, 1000, with_config)
        written = reader.GGUFFile(path).metadata["tokenizer.ggml.token_type"]
        assert written != original
        special = dict(pad=0, eos=1, bos=2, unk=3)
        assert reader.original_piece_types(written, special) == original


def test_bad_tokenizer_metadata(tmp_path):
    gguf = pytest.importorskip("gguf")

    for name, edit, fragment in (
            ("bpe.gguf", lambda w: w.add_tokenizer_model("gpt2"), "tokenizer.ggml.model is 'gpt2'"),
            ("none.gguf", lambda w: None, "metadata key tokenizer.ggml.model is missing")):
        writer = gguf.GGUFWriter(str(tmp_path / name), "gemma")
        edit(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        with pytest.raises(ValueError) as e:
            reader.tokenizer_model_bytes(str(tmp_path / name))
        assert str(tmp_path / name) in str(e.value) and fragment in str(e.value)
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_model_bytes(b"\x01\x02 not a proto", source="bytes")
