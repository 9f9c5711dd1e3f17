"""Gemma's tokenizer: a thin wrapper over the SentencePiece model shipped with every checkpoint.

    text --encode--> [2 (<bos>), ids...] --model--> ids --decode / StreamDecoder--> text

Gemma's tokenizer.model (docs/numerics.md, section 3) is a SentencePiece BPE model with byte fallback
(a character outside the vocabulary becomes its UTF-8 bytes, pieces <0x00>..<0xFF>), digits split
one per piece, no dummy prefix and no whitespace clean-up: a space becomes '▁' and nothing else is
normalised. Special pieces are looked up by name in the file (Gemma's ids in brackets):
<pad> (0), <eos> (1), <bos> (2), <unk> (3), <start_of_turn> (106), <end_of_turn> (107).

Text is always plain text. A user who types "<bos>" or "<start_of_turn>" gets the pieces of those
characters, never the special id: only `chat_ids` places turn markers. (transformers turns typed
special-token text into the special ids; SentencePiece itself matches the turn markers in text,
because Gemma's file makes them user-defined pieces.)
"""

import codecs
import os
import re

import sentencepiece as spm

from .errors import GenerationError, TokenizerError, TokenizerNotFoundError

SPECIAL_PIECES = {"pad_id": "<pad>", "eos_id": "<eos>", "bos_id": "<bos>", "unk_id": "<unk>",
                  "start_of_turn_id": "<start_of_turn>", "end_of_turn_id": "<end_of_turn>"}
ROLES = {"user": "user", "model": "model", "assistant": "model"}  # chat role -> Gemma's turn name


class Tokenizer:
    """A Gemma tokenizer.model: encode, decode, the chat format and streaming decode."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise TokenizerNotFoundError(f"tokenizer file not found: {self.path}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.path} is not a SentencePiece tokenizer.model "
                                 f"({e})") from None
        self._find_special_pieces()

    @classmethod
    def from_model_bytes(cls, data, source="serialized SentencePiece model"):
        """A Tokenizer from the bytes of a SentencePiece model: a tokenizer.model's contents, or
        the model formats.gguf.tokenizer_model_bytes rebuilds from a GGUF file's vocabulary.
        `source` names it in error messages (e.g. the GGUF file's path)."""
        tokenizer = cls.__new__(cls)
        tokenizer.path = str(source)
        tokenizer._sp = spm.SentencePieceProcessor()
        try:
            tokenizer._sp.LoadFromSerializedProto(bytes(data))
        except (RuntimeError, OSError, TypeError) as e:
            raise TokenizerError(f"{source}: not a SentencePiece model ({e})") from None
        tokenizer._find_special_pieces()
        return tokenizer

    def _find_special_pieces(self):
        for attribute, piece in SPECIAL_PIECES.items():
            setattr(self, attribute, self._special_id(piece))
        # Special pieces SentencePiece would find inside text (user-defined pieces: the turn
        # markers in Gemma's file). `encode` breaks them up so that text stays text.
        self._markers = [p for p in SPECIAL_PIECES.values()
                         if self._sp.encode(p) == [self._sp.piece_to_id(p)]]
        self._marker_pattern = re.compile("|".join(map(re.escape, self._markers))
                                          or "(?!)")  # (?!) never matches: no markers

    def _special_id(self, piece):
        i = self._sp.piece_to_id(piece)  # gives the <unk> id for a piece the file lacks
        if self._sp.id_to_piece(i) != piece:
            raise TokenizerError(f"{self.path} has no {piece} piece: not a Gemma tokenizer.model")
        return i

    @property
    def vocab_size(self):
        return self._sp.get_piece_size()

    def encode(self, text, bos=True):
        """Plain text -> ids, <bos> first unless bos=False (Gemma degrades badly without it)."""
        check_text(text)
        ids = [self.bos_id] if bos else []
        # A marker typed as text is cut after its "<", so that SentencePiece cannot match it.
        start = 0
        for marker in self._marker_pattern.finditer(text):
            ids += self._sp.encode(text[start:marker.start() + 1])
            start = marker.start() + 1
        return ids + self._sp.encode(text[start:])

    def decode(self, ids):
        """ids -> text: '▁' prints as a space, byte pieces join into characters, and the control
        pieces <bos>, <eos>, <pad> print as nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i):
        return self._sp.id_to_piece(int(i))

    def byte_value(self, i):
        """The byte a byte-fallback piece stands for (<0xE2> -> 0xE2); None for any other piece."""
        return int(self.id_to_piece(i)[3:5], 16) if self._sp.is_byte(int(i)) else None

    def stream_decoder(self):
        return StreamDecoder(self)

    # ------------------------------------------------------------------------------------------
    # The instruction-tuned chat format

    def chat_ids(self, messages, add_generation_prompt=True):
        """A conversation -> ids, as the official chat template (google/gemma-7b-it) builds it:

            <bos><start_of_turn>user\\n{text}<end_of_turn>\\n
                 <start_of_turn>model\\n{text}<end_of_turn>\\n   ... (no line breaks between)
                 <start_of_turn>model\\n                           to ask for the model's answer

        (The "<end_of_turn>model" of the Gemma report is a typo for this.) `messages` are dicts
        {"role": "user" | "model" | "assistant" | "system", "content": str}, "assistant" meaning
        "model". Text is stripped of surrounding whitespace, as the template's `trim` does. Roles
        must alternate, starting with user. Gemma has no system turn: a leading system message is
        folded into the first user turn as system text + "\\n\\n" + user text (transformers'
        template raises an error instead).
        """
        ids = [self.bos_id]
        for role, text in conversation_turns(messages):
            ids += self._turn(role, text)
        return ids + self._generation_prompt() if add_generation_prompt else ids

    def chat_turn_ids(self, user_text, first=False):
        """The ids that add one user turn to a conversation already in the KV cache and ask for
        the model's answer; after the first turn they begin by closing the model's last answer.
        With each reply fed without its stop token,

            chat_turn_ids(u1, first=True) + reply1 + chat_turn_ids(u2) + reply2 + ...

        equals chat_ids of the whole conversation (for replies without surrounding whitespace,
        which the template would trim).
        """
        if first:
            start = [self.bos_id]
        else:  # close the model's answer: the <end_of_turn> that stopped it was never fed back
            start = [self.end_of_turn_id] + self.encode("\n", bos=False)
        return start + self._turn("user", user_text.strip()) + self._generation_prompt()

    def _turn(self, role, text):
        # Between the markers, one plain-text segment, as transformers encodes around them.
        return ([self.start_of_turn_id] + self.encode(f"{role}\n{text}", bos=False)
                + [self.end_of_turn_id] + self.encode("\n", bos=False))

    def _generation_prompt(self):
        return [self.start_of_turn_id] + self.encode("model\n", bos=False)


def check_text(text, what="text"):
    """Raise a GenerationError unless `text` is a str that UTF-8 can encode. Bytes that were not
    UTF-8 reach Python as lone surrogates (U+DC80..U+DCFF: os.fsdecode, surrogateescape)."""
    if not isinstance(text, str):
        raise GenerationError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise GenerationError(f"{what} is not valid UTF-8 text: {byte} at character {e.start} "
                              f"(was it written in another encoding?)") from None


def conversation_turns(messages):
    """Chat messages -> [(turn name, stripped text)], checked: user first, then alternating, and a
    leading system message folded into the first user turn."""
    turns = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise GenerationError(f"message {n} must be a dict with a str 'content', got "
                                  f"{message!r}")
        role = message.get("role")
        if role == "system" and n == 0:
            continue  # folded in below
        if not isinstance(role, str) or role not in ROLES:
            first = " (a system message must come first)" if role == "system" else ""
            raise GenerationError(f"message {n} has role {role!r}; expected 'user', 'model' or "
                                  f"'assistant'{first}")
        expected = "user" if len(turns) % 2 == 0 else "model"
        if ROLES[role] != expected:
            raise GenerationError(f"message {n} has role {role!r}, but Gemma's chat roles "
                                  f"alternate user, model, user, ... starting with user: expected "
                                  f"{expected!r}")
        turns.append((ROLES[role], message["content"].strip()))
    if not turns:
        raise GenerationError("a conversation needs a user message")
    if messages[0]["role"] == "system":
        turns[0] = ("user", f"{messages[0]['content'].strip()}\n\n{turns[0][1]}")
    return turns


class StreamDecoder:
    """Decodes ids one at a time, for printing them as they arrive.

    A character outside the vocabulary arrives as 2-4 byte pieces (气 = <0xE6><0xB0><0x94>), and
    printing each piece alone would print replacement marks. So ids are held back while the bytes
    at their end begin a UTF-8 character still missing its last bytes, and released, decoded
    together, as soon as the character is complete (or can no longer be). The pushes and the final
    flush() together print exactly decode(all ids).
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._pending = []  # ids not printed yet

    def push(self, token_id):
        """Add one id; return the text it completes ("" while a character is unfinished)."""
        self._pending.append(int(token_id))
        return "" if self._ends_mid_character() else self.flush()

    def flush(self):
        """Return whatever is held back (an unfinished character prints as U+FFFD, as decode)."""
        text = self._tokenizer.decode(self._pending)
        self._pending = []
        return text

    def _ends_mid_character(self):
        tail = bytearray()  # the bytes of the byte pieces at the end of the pending ids
        for i in reversed(self._pending):
            byte = self._tokenizer.byte_value(i)
            if byte is None:
                break
            tail.insert(0, byte)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.decode(bytes(tail), final=False)
        return len(decoder.getstate()[0]) > 0  # bytes kept back: the start of a character
