"""Choosing the next token, and generating text through the KV cache.

    logits [V] -> / temperature -> keep the top k -> softmax -> keep the top p (nucleus)
               -> renormalise -> draw one token by inverse CDF with a seeded uniform

The filters run in transformers' order (generate(do_sample=True): temperature, top-k, top-p), so
top-p measures its mass over the tokens top-k kept. gemma_pytorch applies top-p to the full
distribution first and top-k after; with both set it can keep more tokens than this order does.
Temperature 0 is greedy decoding (argmax, the lowest id on a tie); top-k and top-p then do nothing.

Reproducibility: the uniforms come from an explicit numpy.random.Generator (PCG64, seeded), never
from numba's RNG, and the draw runs in float64 over the kept tokens in increasing id order, so the
same seed and the same logits give the same tokens anywhere. The logits do not depend on the
thread count (no kernel splits a sum across threads); to make them bitwise identical across
machines as well, generate with reproducible=True (decode kernels without fastmath).

Generation: the prompt is prefilled (decode.Decoder.prefill: logits of its last position only),
then each new token is fed back alone through the decode engine (decode.py), its keys and values
joining the cache. generate_batch runs several prompts (or n
samples of one) at once: each step feeds one token of every sequence still running, reading each
weight once for all of them, and gives each sequence the tokens it would get alone.
"""

import math
import time
import warnings

import numpy as np

from .errors import ContextFullError, GenerationError, TokenizerError
from .decode import Decoder
from .decode_gemma3 import Decoder3
from .gemma3 import Gemma3

# ----------------------------------------------------------------------------------------------
# 1. The filters: each returns a [V] boolean mask of the tokens it keeps.


def top_k_mask(logits, k):
    """Keep the k highest logits, and any logit tied with the k-th highest.  [V] -> [V] bool

    Ties at the boundary are all kept (as transformers' TopKLogitsWarper does), so the result does
    not depend on an arbitrary order among equal logits.
    """
    k = min(k, len(logits))
    kth_highest = np.partition(logits, -k)[-k]
    return logits >= kth_highest


def top_p_mask(probs, p):
    """Keep the most probable tokens until their mass reaches p (nucleus sampling).  [V] -> [V] bool

    A token is kept when the tokens strictly more probable than it hold less than p of the mass, so
    the most probable token is always kept and tied tokens are kept or dropped together. p = 1
    keeps every token.
    """
    if p >= 1:
        return np.ones(len(probs), bool)
    # Most probable first. The order among equal probabilities does not matter: tied tokens share
    # one decision, and the running sum adds the same values whichever of them comes first.
    order = np.argsort(-probs)
    sorted_probs = probs[order]
    mass_before = np.concatenate([[0.0], np.cumsum(sorted_probs)[:-1]])
    # A tied group starts where the probability changes; its members share the mass before it.
    group_start = np.searchsorted(-sorted_probs, -sorted_probs, side="left")
    keep = np.empty(len(probs), bool)
    keep[order] = mass_before[group_start] < p
    return keep


def softmax64(logits):
    """float64 softmax over the last axis; -inf logits get probability 0."""
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def filtered_probs(logits, temperature, top_k=None, top_p=None):
    """The distribution a token is drawn from: [V] logits -> [V] float64 probabilities.

    temperature > 0 divides the logits; top_k then keeps the k highest; top_p keeps the nucleus of
    what is left. Dropped tokens get probability 0 and the kept ones are renormalised.
    """
    z = np.asarray(logits, np.float64) / temperature
    if top_k is not None:
        z = np.where(top_k_mask(z, top_k), z, -np.inf)
    probs = softmax64(z)
    if top_p is not None:
        probs = np.where(top_p_mask(probs, top_p), probs, 0.0)
        probs /= probs.sum()
    return probs


def draw(probs, u):
    """The token at uniform u in [0, 1) of the CDF of probs, summed in increasing id order."""
    ids = np.flatnonzero(probs)
    cdf = np.cumsum(probs[ids])
    i = np.searchsorted(cdf, u * cdf[-1], side="right")
    return int(ids[min(i, len(ids) - 1)])  # min(): u * total may round up to the total


def sample_token(logits, temperature, top_k, top_p, rng):
    """One token id from [V] logits: argmax when temperature is 0, else a seeded draw."""
    if temperature == 0:
        return int(np.argmax(logits))
    return draw(filtered_probs(logits, temperature, top_k, top_p), rng.random())


# ----------------------------------------------------------------------------------------------
# 2. Settings, checked once, with the random stream they draw from


def check_sampling(temperature=0.0, top_k=None, top_p=None, seed=None):
    """Raise a ValueError naming the first sampling argument that is out of range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise GenerationError(f"top_k must be an integer >= 1 (or None for no limit), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise GenerationError(f"top_p must be in (0, 1] (or None for no limit), got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise GenerationError(f"seed must be an integer >= 0 (or None for a fresh seed), got {seed!r}")


def check_max_new_tokens(max_new_tokens):
    n = max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


class Sampler:
    """Picks next tokens with fixed settings, drawing from its own seeded random stream.

    The stream advances one uniform per sampled token (none when greedy), so the same seed and the
    same logits give the same tokens, across turns of a chat too.
    """

    def __init__(self, temperature=0.0, top_k=None, top_p=None, seed=None):
        check_sampling(temperature, top_k, top_p, seed)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits):
        """[V] logits -> a token id."""
        return sample_token(logits, self.temperature, self.top_k, self.top_p, self.rng)


# ----------------------------------------------------------------------------------------------
# 3. Generation: token ids, then text


def generate_ids(decoder, prompt_ids, sampler, *, cache, max_new_tokens, stop_ids=(), stats=None):
    """Yield up to max_new_tokens new token ids following prompt_ids (arguments already checked).

    prompt_ids continue whatever `cache` already holds: `decoder`, a decode.Decoder, prefills
    them, then every new token is fed back alone through it. A token in stop_ids ends generation
    and is neither yielded nor cached. Generation also ends, with a warning, when the cache is
    full (the model's max positions at most). The cache ends holding the prompt and every yielded
    token but possibly the last, which is only fed back when another token is wanted: a caller
    continuing the sequence feeds what the cache lacks.

    stats, a dict, receives: prompt_tokens, prefill_seconds, first_token_seconds, new_tokens,
    decode_steps, decode_seconds, stop ("stop token", "max_new_tokens" or "context full").
    """
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=len(prompt_ids), new_tokens=0, decode_steps=0, decode_seconds=0.0,
                 stop="max_new_tokens")
    start = time.perf_counter()
    logits = decoder.prefill(prompt_ids, cache)                                     # [V]
    stats["prefill_seconds"] = time.perf_counter() - start
    for n in range(max_new_tokens):
        token = sampler(logits)
        if n == 0:
            stats["first_token_seconds"] = time.perf_counter() - start
        if token in stop_ids:
            stats["stop"] = "stop token"
            return
        if cache.length == cache.max_len:  # the token would sit at a position the cache lacks
            stats["stop"] = "context full"
            warnings.warn(f"generation stopped after {n} new tokens: the context is full "
                          f"({cache.max_len} positions)", stacklevel=2)
            return
        stats["new_tokens"] += 1
        yield token
        if n + 1 < max_new_tokens:
            step = time.perf_counter()
            logits = decoder.step(token, cache)                                     # [V]
            stats["decode_seconds"] += time.perf_counter() - step
            stats["decode_steps"] += 1


def generate_batch_ids(decoder, prompts, samplers, *, caches, max_new_tokens, stop_ids=(),
                       stats=None):
    """New token ids for several sequences at once (arguments already checked). -> [[id, ...]]

    Sequence b is prompts[b] continuing caches[b] (a cache of its own), sampled by samplers[b]:
    its list holds exactly the tokens generate_ids(decoder, prompts[b], samplers[b],
    cache=caches[b], ...) yields, with the same stops and the same state of its cache at the end.
    The short prompts are prefilled together, then each step feeds one token of every sequence
    still running (decode.Decoder.step_many), reading each weight once for all of them.

    stats, a dict, receives: sequences, prompt_tokens, prefill_seconds, first_token_seconds,
    new_tokens and decode_seconds (summed over sequences), decode_steps (batched steps), and
    stops (each sequence's reason, as generate_ids names it).
    """
    stats = {} if stats is None else stats
    B = len(prompts)
    stats.update(sequences=B, prompt_tokens=sum(len(p) for p in prompts), new_tokens=0,
                 decode_steps=0, decode_seconds=0.0, stops=["max_new_tokens"] * B)
    start = time.perf_counter()
    logits = decoder.prefill_many(prompts, caches)                                  # [B, V]
    stats["prefill_seconds"] = time.perf_counter() - start
    new = [[] for _ in range(B)]
    running = list(range(B))
    for n in range(max_new_tokens):
        fed = []  # the sequences that take their token into a next step
        for b, row in zip(running, logits):
            token = samplers[b](row)
            if token in stop_ids:
                stats["stops"][b] = "stop token"
            elif caches[b].length == caches[b].max_len:
                stats["stops"][b] = "context full"
                warnings.warn(f"sequence {b}: generation stopped after {n} new tokens: the "
                              f"context is full ({caches[b].max_len} positions)", stacklevel=2)
            else:
                new[b].append(token)
                fed.append(b)
        if n == 0:
            stats["first_token_seconds"] = time.perf_counter() - start
        stats["new_tokens"] += len(fed)
        running = fed
        if not running or n + 1 == max_new_tokens:
            break
        step = time.perf_counter()
        logits = decoder.step_many([new[b][-1] for b in running], [caches[b] for b in running])
        stats["decode_seconds"] += time.perf_counter() - step
        stats["decode_steps"] += 1
    return new


def decoder_for(model, reproducible=False):
    """The decode engine of `model`: decode.Decoder for Gemma 1, decode_gemma3.Decoder3 for
    Gemma 2 and 3 (same methods)."""
    if isinstance(model, Gemma3):
        return Decoder3(model, reproducible)
    return Decoder(model, reproducible)


def check_room(cache, n_tokens):
    """A clear error when n_tokens more positions do not fit in the cache."""
    if cache.length + n_tokens > cache.max_len:
        held = f" after the {cache.length} already in the conversation" if cache.length else ""
        raise ContextFullError(f"prompt: {n_tokens} tokens{held} do not fit in the context of "
                         f"{cache.max_len} positions")


def check_vocab(model, tokenizer):
    """The tokenizer and the checkpoint must number the same tokens."""
    if tokenizer.vocab_size != model.config.n_real_tokens:
        raise TokenizerError(f"the tokenizer has {tokenizer.vocab_size} pieces but the checkpoint's "
                         f"embedding has {model.config.n_real_tokens} token rows: they do not "
                         f"belong together")


def prompt_ids(tokenizer, prompt):
    """Text -> its ids with <bos> first (Gemma degrades badly without it); ids pass as they are."""
    if isinstance(prompt, str):
        if not prompt:
            raise GenerationError("prompt is empty")
        return tokenizer.encode(prompt, bos=True)
    ids = [int(i) for i in prompt]
    if not ids:
        raise GenerationError("prompt has no token ids")
    return ids


def default_stops(tokenizer):
    """<eos>, and <end_of_turn> which ends an -it model's answer."""
    return (tokenizer.eos_id, tokenizer.end_of_turn_id)


def stream(model, tokenizer, prompt, *, max_new_tokens=256, temperature=0.0, top_k=None,
           top_p=None, seed=None, stop=None, stats=None, reproducible=False):
    """Yield the text that follows `prompt`, piece by piece as tokens are decoded.

    prompt: text (encoded with <bos> first) or a list of token ids used as they are (for example
    tokenizer.chat_ids(messages) for an -it model). stop: token ids that end the text (default
    <eos> and <end_of_turn>; () runs to max_new_tokens). Pieces never split a UTF-8 character.
    stats: see generate_ids. reproducible: decode with the fastmath-free kernels (decode.Decoder).
    Arguments are checked here, before the first piece is asked for.
    """
    sampler = Sampler(temperature, top_k, top_p, seed)
    check_max_new_tokens(max_new_tokens)
    check_vocab(model, tokenizer)
    ids = prompt_ids(tokenizer, prompt)
    # Room for the prompt and the new tokens, within the model's max positions.
    cache = model.new_cache(min(model.config.max_positions, len(ids) + max_new_tokens))
    check_room(cache, len(ids))
    stop_ids = default_stops(tokenizer) if stop is None else tuple(stop)
    tokens = generate_ids(decoder_for(model, reproducible), ids, sampler, cache=cache,
                          max_new_tokens=max_new_tokens, stop_ids=stop_ids, stats=stats)
    return decode_stream(tokenizer, tokens)


def decode_stream(tokenizer, tokens):
    """Token ids -> text pieces, holding back the bytes of a character until it is complete."""
    decoder = tokenizer.stream_decoder()
    for token in tokens:
        piece = decoder.push(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


def generate(model, tokenizer, prompt, **options):
    """The text that follows `prompt` (options as in `stream`)."""
    return "".join(stream(model, tokenizer, prompt, **options))


def generate_batch(model, tokenizer, prompts, *, max_new_tokens=256, temperature=0.0, top_k=None,
                   top_p=None, seed=None, stop=None, stats=None, reproducible=False):
    """The texts that follow each of `prompts`, generated together. -> [text, ...]

    prompts: a list of prompts as `stream` takes them (text, or token ids); for n samples of one
    prompt, pass it n times. Text b is exactly generate(model, tokenizer, prompts[b], ...) with
    the same options, except the seed: sequence b draws from seed + b (with seed=None, each from a
    fresh seed). stats: see generate_batch_ids.
    """
    if isinstance(prompts, (str, bytes)) or not prompts:
        raise GenerationError("prompts must be a non-empty list of prompts (texts or lists of ids)")
    check_sampling(temperature, top_k, top_p, seed)
    check_max_new_tokens(max_new_tokens)
    check_vocab(model, tokenizer)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    caches = [model.new_cache(min(model.config.max_positions, len(p) + max_new_tokens))
              for p in ids]
    for cache, p in zip(caches, ids):
        check_room(cache, len(p))
    samplers = [Sampler(temperature, top_k, top_p, None if seed is None else seed + b)
                for b in range(len(ids))]
    stop_ids = default_stops(tokenizer) if stop is None else tuple(stop)
    new = generate_batch_ids(decoder_for(model, reproducible), ids, samplers, caches=caches,
                             max_new_tokens=max_new_tokens, stop_ids=stop_ids, stats=stats)
    return ["".join(decode_stream(tokenizer, tokens)) for tokens in new]


# ----------------------------------------------------------------------------------------------
# 4. Chat: turns of an -it model, one KV cache for the whole conversation


class Chat:
    """A conversation whose KV cache persists: each turn feeds only the tokens the cache lacks.

    `ids` is the conversation in Gemma's chat format, exactly the tokens that belong in the cache;
    the cache holds its first `cache.length`. A new user turn appends its tokens
    (`<end_of_turn>\\n` closing the model's last answer, then the user's turn and
    `<start_of_turn>model\\n`) and feeds ids[cache.length:]: the new turn, plus the last answer
    token if generation stopped at max_new_tokens.
    """

    def __init__(self, model, tokenizer, sampler, *, max_new_tokens=512, max_len=None,
                 reproducible=False):
        check_max_new_tokens(max_new_tokens)
        check_vocab(model, tokenizer)
        self.model, self.tokenizer, self.sampler = model, tokenizer, sampler
        self.decoder = decoder_for(model, reproducible)
        self.max_new_tokens = max_new_tokens
        # The full-length cache is allocated zeroed, and the OS backs only the pages written.
        self.cache = model.new_cache(max_len)
        self.ids = []

    def reset(self):
        """Forget the conversation (the sampler's random stream goes on)."""
        self.cache.length = 0
        self.ids = []

    def turn_ids(self, text):
        """The tokens that add a user turn to the conversation so far."""
        return self.tokenizer.chat_turn_ids(text, first=not self.ids)

    def reply(self, text, stats=None):
        """Yield the model's answer to the user's `text`, piece by piece."""
        if not text.strip():
            raise GenerationError("the message is empty")
        new_ids = self.turn_ids(text)
        check_room(self.cache, len(self.ids) - self.cache.length + len(new_ids))
        self.ids += new_ids
        tokens = generate_ids(self.decoder, self.ids[self.cache.length:], self.sampler,
                              cache=self.cache, max_new_tokens=self.max_new_tokens,
                              stop_ids=default_stops(self.tokenizer), stats=stats)
        return decode_stream(self.tokenizer, self.remember(tokens))

    def remember(self, tokens):
        """Pass the answer's tokens through, adding each to the conversation."""
        for token in tokens:
            self.ids.append(token)
            yield token
