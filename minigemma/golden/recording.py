"""Recording a golden: run prompts through minigemma's reference forward and write what it computes.

    minigemma golden record --weights DIR --prompts prompts.jsonl --out GOLDEN [--activations]

The logits come from Gemma.forward (model.py), the reference. The greedy continuations come from
the decode engine's EXACT build (decode.py, kernels.py: float32 sums in source order, no
fastmath, the same bits on any CPU), GREEDY_BATCH prompts stepping together, each weight read
once per step for all of them; a prompt's tokens are the same bits alone or in any batch, so
`golden check` (one prompt at a time) computes them identically.

Shape legend: T tokens, V vocab, k top-k width, n new tokens.
"""

import json
import os
import time
import zipfile

import numpy as np

from ..decode import Decoder
from ..errors import GoldenError, GoldenNotFoundError
from .files import CHECKSUMS, FORMAT, FORMAT_VERSION, add_array, golden_directory, input_hashes

CHUNK = 128  # prompt tokens per forward when recording long prompts: [CHUNK, V] logits at a time
GREEDY_BATCH = 8  # prompts whose greedy continuations step together (each holds its KV cache)

# Defaults: full logits for prompts up to 64 tokens (64 x 256000 float32 = 66 MB per prompt on the
# real vocabulary); longer prompts keep the top 64 logits of each position plus the last row.
FULL_LOGITS_MAX_TOKENS = 64
TOP_K = 64
NEW_TOKENS = 16
# Recommended tolerances, recorded in golden.json. Measured, minigemma against transformers in
# float32 at the true 2B shape (random weights): logits max |diff| 1.4e-5 (logits up to 12),
# activations max |diff| / max |golden| <= 6.3e-6 at every point; the weakest classic bug (exact
# erf GELU) moves its first activation by ~1e-4.
ATOL, RTOL = 1e-4, 1e-4    # logits: |ours - golden| <= atol + rtol * |golden|, elementwise
ACTIVATION_TOL = 3e-5      # divergence finder: max |error| / max |golden| at one activation point


# ----------------------------------------------------------------------------------------------
# Prompts: one JSON object per line, with a name and exactly one of "text", "chat" or "ids".


def read_prompts(path):
    """[{"name", and "text" | "chat" | "ids", optional "bos" (text only)}] from a .jsonl file."""
    prompts, names = [], set()
    if not os.path.isfile(path):
        raise GoldenNotFoundError(f"{path}: prompts file not found (one JSON object per line)")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GoldenError(f"{where}: not valid UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                  f"column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)
            except json.JSONDecodeError as e:
                raise GoldenError(f"{where}: not valid JSON ({e})") from None
            check_prompt(prompt, where)
            if prompt["name"] in names:
                raise GoldenError(f"{where}: prompt name {prompt['name']!r} is used twice")
            names.add(prompt["name"])
            prompts.append(prompt)
    if not prompts:
        raise GoldenError(f"{path}: no prompts")
    return prompts


def check_prompt(prompt, where):
    if not isinstance(prompt, dict):
        raise GoldenError(f"{where}: expected a JSON object, got {type(prompt).__name__}")
    name = prompt.get("name")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise GoldenError(f"{where}: 'name' must be a non-empty string of letters, digits, '-' "
                         f"and '_' (it becomes an array name in golden.npz), got {name!r}")
    kinds = [k for k in ("text", "chat", "ids") if k in prompt]
    if len(kinds) != 1:
        raise GoldenError(f"{where}: prompt {name!r} needs exactly one of 'text', 'chat', 'ids' "
                         f"(found {kinds or 'none'})")
    ids = prompt.get("ids")
    if ids is not None and (not isinstance(ids, list) or not ids
                            or not all(isinstance(i, int) and i >= 0 for i in ids)):
        raise GoldenError(f"{where}: prompt {name!r}: 'ids' must be a non-empty list of token ids")


def prompt_token_ids(prompt, tokenizer):
    """The token ids of one prompt: raw ids as given, text encoded with BOS (unless "bos": false),
    chat messages through the Gemma chat template with the generation prompt."""
    if "ids" in prompt:
        return list(prompt["ids"])
    if tokenizer is None:
        raise GoldenError(f"prompt {prompt['name']!r} is text, so recording it needs a tokenizer "
                         f"(--tokenizer, or tokenizer.model in the weights directory)")
    if "text" in prompt:
        return tokenizer.encode(prompt["text"], bos=prompt.get("bos", True))
    return tokenizer.chat_ids(prompt["chat"])


def load_tokenizer(path):
    from ..tokenizer import Tokenizer  # only text and chat prompts need one
    return Tokenizer(path)


# ----------------------------------------------------------------------------------------------
# Running the model: prompt logits (full, or top-k for long prompts) and the greedy continuation.


def top_k_logits(logits, k):
    """The k largest logits of every row, largest first (ties: lower id first), and their ids.
    [T, V] -> [T, k] ids, [T, k] logits"""
    ids = np.argpartition(-logits, k - 1, axis=-1)[:, :k]     # the k largest, in no order
    values = np.take_along_axis(logits, ids, -1)
    order = np.lexsort((ids, -values), axis=-1)
    ids = np.take_along_axis(ids, order, -1)
    return ids.astype(np.int32), np.take_along_axis(logits, ids, -1)


def run_prompt(model, ids, new_tokens, reduce, activations=False, decoder=None):
    """{array name: array} for one prompt, as golden.npz stores it under "<prompt>/": the arrays
    of prefill_prompt, then `new_tokens` greedy tokens ("greedy"). decoder: a decode.Decoder
    (default: the EXACT build for `model`)."""
    out, cache, last_logits, n = prefill_prompt(model, ids, new_tokens, reduce, activations)
    decoder = decoder or Decoder(model, reproducible=True)
    out["greedy"] = greedy_continuations(decoder, [last_logits], [cache], [n])[0]
    return out


def prefill_prompt(model, ids, new_tokens, reduce, activations=False):
    """The prompt's arrays through the reference forward, and what its greedy continuation
    starts from. -> ({array name: array}, KV cache, last logits [V], greedy tokens to make)

    The prompt runs CHUNK tokens at a time through Gemma.forward, so that the [T, V] logits of a
    long prompt never exist at once. `reduce(start, logits)` turns the logits [t, V] of the chunk
    starting at `start` into the arrays kept: {"logits": logits} in full, or top-k ids and logits
    (then the full last row is kept as "last_logits" too). With activations, every named
    activation is kept. The greedy continuation gets `new_tokens`, or what fits in the model's
    max positions.
    """
    cache = model.new_cache(min(len(ids) + new_tokens, model.config.max_positions))
    parts = {}
    for start in range(0, len(ids), CHUNK):
        record = {} if activations else None
        logits = model.forward(ids[start:start + CHUNK], cache, record=record).astype(np.float32)
        for name, array in {**(record or {}), **reduce(start, logits)}.items():
            parts.setdefault(name, []).append(array)
    out = {"tokens": np.asarray(ids, np.int32)}
    out.update({name: np.concatenate(arrays) for name, arrays in parts.items()})
    out = {name: a.astype(np.float32) if a.dtype.kind == "f" else a for name, a in out.items()}
    if "logits" not in out:
        out["last_logits"] = logits[-1]
    return out, cache, logits[-1], cache.max_len - len(ids)


def full_logits(start, logits):
    """run_prompt's reduce for short prompts: every logit."""
    return {"logits": logits}


def top_k_of_each_row(k):
    """run_prompt's reduce for long prompts: the top-k ids and logits of every position."""
    def reduce(start, logits):
        ids, values = top_k_logits(logits, min(k, logits.shape[-1]))
        return {"topk_ids": ids, "topk_logits": values}
    return reduce


def greedy_continuations(decoder, last_logits, caches, counts):
    """counts[b] greedy token ids after each prefilled cache (argmax; EOS does not stop them),
    every sequence still short of its count stepping together. -> [[n] int32 per sequence]"""
    tokens = [[] for _ in caches]
    running = [b for b in range(len(caches)) if counts[b] > 0]
    logits = [last_logits[b] for b in running]
    while running:
        for b, row in zip(running, logits):
            tokens[b].append(int(np.argmax(row)))
        running = [b for b in running if len(tokens[b]) < counts[b]]
        if running:  # the last token of a sequence is never fed back
            logits = decoder.step_many([tokens[b][-1] for b in running],
                                       [caches[b] for b in running])
    return [np.asarray(t, np.int32) for t in tokens]


# ----------------------------------------------------------------------------------------------
# Recording


def weight_storage_dtype(model):
    names = {np.dtype(np.uint16): "bfloat16", np.dtype(np.float16): "float16",
             np.dtype(np.float32): "float32"}
    return "/".join(sorted({names.get(w.dtype, str(w.dtype)) for w in model.weights.values()}))


def record(weights, prompts, out, *, tokenizer=None, activations=False, new_tokens=NEW_TOKENS,
           dtype=np.float32, normalizer="exact", full_logits_max_tokens=FULL_LOGITS_MAX_TOKENS,
           top_k=TOP_K, atol=ATOL, rtol=RTOL, activation_tol=ACTIVATION_TOL, overwrite=False,
           progress=None):
    """Run every prompt through minigemma and write the golden directory `out` atomically.

    prompts: a list of prompt dicts (see read_prompts) or the path of a .jsonl file.
    tokenizer: path of a tokenizer.model (default: the one in `weights`, if any); needed only for
    text and chat prompts, but hashed into golden.json whenever there is one.
    activations: also store every named activation: True for every prompt whose logits are stored
    in full, or a list of prompt names (each must be a full-logits prompt).
    progress: called with one line per prompt, and one per group of greedy continuations (the
    CLI prints them to stderr).
    """
    from ..checkpoint import load

    if isinstance(prompts, (str, os.PathLike)):
        prompts = read_prompts(prompts)
    if tokenizer is None and os.path.exists(os.path.join(weights, "tokenizer.model")):
        tokenizer = os.path.join(weights, "tokenizer.model")
    if new_tokens < 0 or full_logits_max_tokens < 0 or top_k < 1:
        raise GoldenError("new_tokens and full_logits_max_tokens must be >= 0 and top_k >= 1")
    model = load(weights, dtype=dtype, normalizer=normalizer)
    needs_tokenizer = any("ids" not in p for p in prompts)
    tok = load_tokenizer(tokenizer) if tokenizer and needs_tokenizer else None
    wanted = activation_prompts(prompts, activations)

    decoder = Decoder(model, reproducible=True)
    decoder.warm_up()
    entries, checksums = [], {}  # checksums: {array name: sha256 of its .npy in golden.npz}

    def prefill(npz, n, prompt):
        """Write one prompt's arrays but "greedy". -> (progress line, name, cache, last logits,
        greedy tokens to make)"""
        started = time.perf_counter()
        ids = prompt_token_ids(prompt, tok)
        k = None if len(ids) <= full_logits_max_tokens else top_k
        keep = prompt["name"] in wanted and k is None
        if prompt["name"] in wanted and activations is not True and not keep:
            raise GoldenError(f"prompt {prompt['name']!r}: {len(ids)} tokens is over "
                             f"full_logits_max_tokens ({full_logits_max_tokens}); "
                             f"activations are stored only with full logits")
        reduce = full_logits if k is None else top_k_of_each_row(k)
        arrays, cache, last, n_greedy = prefill_prompt(model, ids, new_tokens, reduce, keep)
        for key, array in arrays.items():
            checksums[f"{prompt['name']}/{key}"] = add_array(npz, f"{prompt['name']}/{key}", array)
        entries.append({**prompt, "token_ids": [int(i) for i in ids],
                        "logits": "full" if k is None else f"top{k}", "activations": keep})
        stored = "full logits" if k is None else f"last logits + top-{k}"
        line = (f"[{n}/{len(prompts)}] {prompt['name']}: {len(ids)} tokens, {stored}, "
                f"{n_greedy} greedy tokens (prompt {time.perf_counter() - started:.1f} s)")
        return line, prompt["name"], cache, last, n_greedy

    with golden_directory(out, overwrite) as tmp:
        with zipfile.ZipFile(os.path.join(tmp, "golden.npz"), "w") as npz:
            for first in range(0, len(prompts), GREEDY_BATCH):
                group = [prefill(npz, n, p)
                         for n, p in enumerate(prompts[first:first + GREEDY_BATCH], first + 1)]
                lines, names, caches, last, counts = zip(*group)
                started = time.perf_counter()
                greedy = greedy_continuations(decoder, last, caches, counts)
                for line, name, tokens in zip(lines, names, greedy):
                    checksums[f"{name}/greedy"] = add_array(npz, f"{name}/greedy", tokens)
                    if progress:
                        progress(line)
                if progress:
                    progress(f"  greedy continuations of prompts {first + 1}-{first + len(group)} "
                             f"together: {sum(map(len, greedy))} tokens in "
                             f"{time.perf_counter() - started:.1f} s")
        meta = golden_meta(model, input_hashes(weights, tokenizer), entries, new_tokens=new_tokens,
                           logits={"full_logits_max_tokens": full_logits_max_tokens,
                                   "top_k": top_k},
                           tolerances={"logits_atol": atol, "logits_rtol": rtol,
                                       "activation_rel": activation_tol})
        meta[CHECKSUMS] = checksums
        with open(os.path.join(tmp, "golden.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
            f.write("\n")
    return out


def golden_meta(model, files, prompts, *, new_tokens, logits, tolerances):
    """The contents of golden.json."""
    from .. import __version__
    from ..model import activation_points

    c = model.config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "minigemma_version": __version__,
        "model": {k: getattr(c, k) for k in c.__dataclass_fields__ if k != "normalizer"},
        "precision": {"compute_dtype": model.dtype.name, "normalizer": c.normalizer,
                      "normalizer_value": float(model.normalizer),
                      "weight_storage": weight_storage_dtype(model)},
        "files": files,
        "generation": {"strategy": "greedy", "new_tokens": new_tokens, "stop_on_eos": False},
        "logits": logits,
        "tolerances": tolerances,
        "activation_points": activation_points(c.n_layers),
        "prompts": prompts,
    }


def activation_prompts(prompts, activations):
    """The names of the prompts whose activations to store (activations: bool or names)."""
    names = [p["name"] for p in prompts]
    if isinstance(activations, bool):
        return set(names) if activations else set()
    unknown = sorted(set(activations) - set(names))
    if unknown:
        raise GoldenError(f"activations: no prompt named {unknown[0]!r} "
                         f"(prompts: {', '.join(names)})")
    return set(activations)


