"""Train a tiny SentencePiece tokenizer laid out like Gemma's, for tests and the no-download demo.

The real Gemma tokenizer.model (256000 pieces) cannot be downloaded here, so this trains a
512-piece model with the same trainer settings (BPE, byte fallback, digits split, whitespace kept as
it is, no dummy prefix, no normalisation beyond ' ' -> '▁') and the
special pieces at Gemma's ids:

    0 <pad>  1 <eos>  2 <bos>  3 <unk>  4 <mask>  5 <2mass>  6 [@BOS@]  7..105 <unused0>..<unused98>
    106 <start_of_turn>  107 <end_of_turn>  108..363 the byte pieces <0x00>..<0xFF>  364.. BPE

<pad>/<eos>/<bos> are control pieces and 4..107 user-defined ones. In Gemma's file too the turn
markers are user-defined (type 4; transformers PR #32191 review); the types of <mask> and <unusedN>
there are not verified.

Training is single-threaded on the fixed corpus below, so the output is the same bytes every time.

    python -m minigemma.tiny_tokenizer OUT
"""

import io
import os
import sys

import sentencepiece as spm

VOCAB_SIZE = 512  # the tiny demo checkpoint's embedding rows

# Ids 4..107 in Gemma's order; the trainer gives user-defined symbols the lowest free ids in turn.
USER_DEFINED = (["<mask>", "<2mass>", "[@BOS@]"] + [f"<unused{i}>" for i in range(99)]
                + ["<start_of_turn>", "<end_of_turn>"])

# A few KB of mixed text: English, Python (tabs, runs of spaces), CJK, emoji, digits, markup.
# One training sentence per line; newlines themselves are left to byte fallback (<0x0A>).
CORPUS = """\
The quick brown fox jumps over the lazy dog.
Gemma is a family of lightweight, open models built from the research behind Gemini.
A tokenizer turns text into a sequence of integers, and a model turns those integers into more text.
The model reads the whole prompt at once, then writes one token at a time, reusing what it has seen.
Every answer starts with the beginning-of-sequence token, and a chat turn ends with end of turn.
Hello, world! How are you today? I am fine, thank you for asking.
In 1969, 3 astronauts flew 384400 km to the Moon; the trip took about 76 hours.
Prices rose 2.5% in 2023, from $19.99 to $20.49, while 1,000,000 people watched.
Call 555-0123 before 10:30 on 2024-02-21, or write to hello@example.com.
She said: "It's not what you say, it's how you say it." He replied, 'Fair enough.'
def attention(q, k, v):
    scores = q @ k.T / math.sqrt(q.shape[-1])
    return softmax(scores) @ v
for i in range(10):
\tif i % 2 == 0:
\t\tprint(i, "is even")
\telse:
\t\tprint(i, "is odd")
class Tokenizer:
    def __init__(self, path):
        self.path = path
x = [1, 2, 3]  # three numbers
y = {"a": 1, "b": 2}    # a dict,    aligned with spaces
<html><body><p>Hello</p><s>struck</s></body></html>
name\tage\tcity
Alice\t30\tParis
Bob\t25\tTokyo
今天天气很好，我们去公园散步吧。
生活的真谛是什么？学习、工作和生活。
人工智能正在改变世界。
こんにちは、世界！
안녕하세요!
Emoji: 😀 😂 🎉 👍 ❤️ 🚀 — and a family: 👨‍👩‍👧.
Accents: café, naïve, résumé, Zürich, São Paulo.
Math: x² ≤ y, π ≈ 3.14159.
Whitespace:  two spaces,   three spaces,    four spaces, and a trailing space 
    indented line
        more indented line
The end of the story is not the end of the story.
The model reads the text from left to right, and each word it writes depends on the words before it.
When the story is long, the model keeps the keys and values of the earlier words in a cache.
A small model can still be useful: it can answer simple questions and write short notes.
Reading the code is the best way to learn how the model works, one function at a time.
The weights are stored in a file, and the program loads them into memory before it starts.
Each layer of the model has attention and a feed-forward network.
The output of one layer is the input of the next.
The tokenizer splits the text into pieces, and each piece has a number in the vocabulary.
Some pieces are whole words, some are parts of words, and some are single letters or bytes.
If a character is not in the vocabulary, the tokenizer falls back to the bytes of its encoding.
There is a special token at the start of every sequence, and another one at the end of every turn.
We tested the program on many kinds of text: stories, letters, lists, tables, and source code.
The answer was the same every time, because the program does the same arithmetic in the same order.
Good tests compare the result with another implementation, and they fail when the result is wrong.
This is the last line of the training text, and it is here to make the common letters more common.
Once upon a time, there was a small model that could run on any computer.
It did not need a graphics card, only patience and a little memory.
Numbers like 0 1 2 3 4 5 6 7 8 9 and 42 and 2048 are split into single digits.
The user asks a question, and the model answers it as well as it can.
user
model
What is the capital of France? The capital of France is Paris.
Write a poem about the sea. The sea is wide and deep and blue.
"""


def train_tiny_tokenizer(out_path, vocab_size=VOCAB_SIZE):
    """Train the tiny Gemma-layout tokenizer and write it to `out_path` (atomically)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=model,
        model_type="bpe", vocab_size=vocab_size,
        character_coverage=0.98,  # the least allowed: rarer characters are left to byte fallback
        # Gemma's trainer flags (transformers' GemmaConverter docstring).
        byte_fallback=True, split_digits=True, split_by_unicode_script=True, split_by_number=True,
        split_by_whitespace=True, treat_whitespace_as_suffix=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity",  # no NFKC: only ' ' -> '▁'
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=USER_DEFINED,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    tmp = f"{out_path}.tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out_path)
    return out_path


def pad_tokenizer(model_path, out_path, vocab_size):
    """Copy a tokenizer with plain, never-chosen pieces appended up to `vocab_size` (atomically).

    The ids of the real pieces do not change, so text encodes as before; this lets the tiny
    tokenizer drive the random checkpoints of the true Gemma shape (256000 rows). Needs protobuf.
    """
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        model.ParseFromString(f.read())
    lowest = min(p.score for p in model.pieces)
    for i in range(vocab_size - len(model.pieces)):
        piece = model.pieces.add()
        piece.piece, piece.score = f"\u2581pad{i}", lowest - 1 - i
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    tmp = f"{out_path}.tmp"
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
    os.replace(tmp, out_path)
    return out_path


if __name__ == "__main__":
    print(f"wrote {train_tiny_tokenizer(sys.argv[1])}")
