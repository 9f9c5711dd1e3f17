"""Golden outputs: record what minigemma computes on a checkpoint, check it later, and compare
any other Gemma implementation against it.

A golden is a directory of two files that any language can read without minigemma (the format is
documented in tests/conformance/README.md):

    golden.json   format version, minigemma version, model config, precision recipe, sha256 of
                  the weight files and the tokenizer, the prompts and their token ids, generation
                  settings, recommended tolerances
    golden.npz    per prompt "<prompt>/<array>": token ids, logits at every position (or, for long
                  prompts, the full last-position logits plus the top-k ids/logits of every
                  position), the greedy continuation, and optionally the named activations

    minigemma golden record --weights DIR --prompts prompts.jsonl --out GOLDEN [--activations]
    minigemma golden check GOLDEN --weights DIR
    minigemma golden diff GOLDEN OTHER.npz          (see divergence.py)

From another project's tests:

    golden = minigemma.golden.load("GOLDEN")
    logits = {name: my_logits(ids) for name, ids in golden.token_ids().items()}
    minigemma.golden.assert_matches(golden, logits)

Shape legend: T tokens, V vocab, k top-k width, n new tokens.
"""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np

FORMAT = "minigemma-golden"
FORMAT_VERSION = 1
CHUNK = 128  # prompt tokens per forward when recording long prompts: [CHUNK, V] logits at a time

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

POINTS_PER_LAYER = ("attn_norm", "q_rope", "k_rope", "attn_out", "resid_attn",
                    "ffn_norm", "ffn_out", "resid_block")


def activation_points(n_layers):
    """The named activation points of Gemma.forward(record=...), in the order data flows."""
    layers = [f"layers.{i}.{p}" for i in range(n_layers) for p in POINTS_PER_LAYER]
    return ["embed", *layers, "final_norm", "logits"]


# ----------------------------------------------------------------------------------------------
# Prompts: one JSON object per line, with a name and exactly one of "text", "chat" or "ids".


def read_prompts(path):
    """[{"name", and "text" | "chat" | "ids", optional "bos" (text only)}] from a .jsonl file."""
    prompts, names = [], set()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: prompts file not found (one JSON object per line)")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                prompt = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            check_prompt(prompt, where)
            if prompt["name"] in names:
                raise ValueError(f"{where}: prompt name {prompt['name']!r} is used twice")
            names.add(prompt["name"])
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def check_prompt(prompt, where):
    if not isinstance(prompt, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(prompt).__name__}")
    name = prompt.get("name")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"{where}: 'name' must be a non-empty string of letters, digits, '-' "
                         f"and '_' (it becomes an array name in golden.npz), got {name!r}")
    kinds = [k for k in ("text", "chat", "ids") if k in prompt]
    if len(kinds) != 1:
        raise ValueError(f"{where}: prompt {name!r} needs exactly one of 'text', 'chat', 'ids' "
                         f"(found {kinds or 'none'})")
    ids = prompt.get("ids")
    if ids is not None and (not isinstance(ids, list) or not ids
                            or not all(isinstance(i, int) and i >= 0 for i in ids)):
        raise ValueError(f"{where}: prompt {name!r}: 'ids' must be a non-empty list of token ids")


def prompt_token_ids(prompt, tokenizer):
    """The token ids of one prompt: raw ids as given, text encoded with BOS (unless "bos": false),
    chat messages through the Gemma chat template with the generation prompt."""
    if "ids" in prompt:
        return list(prompt["ids"])
    if tokenizer is None:
        raise ValueError(f"prompt {prompt['name']!r} is text, so recording it needs a tokenizer "
                         f"(--tokenizer, or tokenizer.model in the weights directory)")
    if "text" in prompt:
        return tokenizer.encode(prompt["text"], bos=prompt.get("bos", True))
    return tokenizer.chat_ids(prompt["chat"])


def load_tokenizer(path):
    from .tokenizer import Tokenizer  # only text and chat prompts need one
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


def prefill_in_chunks(model, ids, cache):
    """Run a prompt CHUNK tokens at a time through the cache: yields (first position, logits
    [<= CHUNK, V]), so that the [T, V] logits of a long prompt never exist at once."""
    for start in range(0, len(ids), CHUNK):
        yield start, model.forward(ids[start:start + CHUNK], cache).astype(np.float32)


def run_prompt(model, ids, *, new_tokens, top_k=None, activations=False):
    """{array name: array} for one prompt, as golden.npz stores it under "<prompt>/".

    top_k=None keeps the logits [T, V] of every position (and, with activations, every named
    activation); top_k=k keeps the last row [V] and the top-k ids/logits [T, k] of every position.
    """
    max_len = min(len(ids) + new_tokens, model.config.max_positions)
    cache = model.new_cache(max_len)
    out = {"tokens": np.asarray(ids, np.int32)}
    if top_k is None:
        record = {} if activations else None
        logits = model.forward(ids, cache, record=record).astype(np.float32)
        out.update({name: np.asarray(a, np.float32) for name, a in (record or {}).items()})
        out["logits"] = logits
    else:
        ids_rows, logit_rows = [], []
        for _, logits in prefill_in_chunks(model, ids, cache):
            top_ids, top_logits = top_k_logits(logits, min(top_k, logits.shape[-1]))
            ids_rows.append(top_ids)
            logit_rows.append(top_logits)
        out.update(topk_ids=np.concatenate(ids_rows), topk_logits=np.concatenate(logit_rows),
                   last_logits=logits[-1])
    out["greedy"] = greedy_continuation(model, logits[-1], cache, max_len - len(ids))
    return out


def greedy_continuation(model, last_logits, cache, n):
    """n greedy token ids after a prefilled cache (argmax; EOS does not stop it). -> [n] int32"""
    tokens = []
    for _ in range(n):
        tokens.append(int(np.argmax(last_logits)))
        if len(tokens) < n:
            last_logits = model.forward([tokens[-1]], cache)[-1]
    return np.asarray(tokens, np.int32)


# ----------------------------------------------------------------------------------------------
# Files: sha256 of the inputs, a reproducible .npz, and an all-or-nothing golden directory.


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_hashes(weights, tokenizer_path):
    """{file name: sha256} of config.json, the safetensors files and index, and the tokenizer."""
    names = sorted(n for n in os.listdir(weights)
                   if n == "config.json" or n.endswith(".safetensors")
                   or n == "model.safetensors.index.json")
    hashes = {n: sha256_file(os.path.join(weights, n)) for n in names}
    if tokenizer_path:
        hashes["tokenizer.model"] = sha256_file(tokenizer_path)
    return hashes


def add_array(npz, name, array):
    """Add one array to an open .npz (a zip of .npy files), as np.savez would, but with a fixed
    timestamp so that equal arrays give equal bytes."""
    info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    with npz.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)


@contextlib.contextmanager
def golden_directory(out, overwrite=False):
    """Yield a temporary directory beside `out`, renamed to `out` when the block completes and
    removed if it does not: an interrupted run leaves nothing behind, never a half golden."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out}: already exists (remove it, or --force to replace it)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a golden is meant to be shared
        yield tmp
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


# ----------------------------------------------------------------------------------------------
# Recording


def weight_storage_dtype(model):
    names = {np.dtype(np.uint16): "bfloat16", np.dtype(np.float16): "float16",
             np.dtype(np.float32): "float32"}
    return "/".join(sorted({names[w.dtype] for w in model.weights.values()}))


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
    progress: called with one line per prompt (the CLI prints them to stderr).
    """
    from . import load

    if isinstance(prompts, (str, os.PathLike)):
        prompts = read_prompts(prompts)
    if tokenizer is None and os.path.exists(os.path.join(weights, "tokenizer.model")):
        tokenizer = os.path.join(weights, "tokenizer.model")
    if new_tokens < 0 or full_logits_max_tokens < 0 or top_k < 1:
        raise ValueError("new_tokens and full_logits_max_tokens must be >= 0 and top_k >= 1")
    model = load(weights, dtype=dtype, normalizer=normalizer)
    needs_tokenizer = any("ids" not in p for p in prompts)
    tok = load_tokenizer(tokenizer) if tokenizer and needs_tokenizer else None
    wanted = activation_prompts(prompts, activations)

    with golden_directory(out, overwrite) as tmp:
        with zipfile.ZipFile(os.path.join(tmp, "golden.npz"), "w") as npz:
            entries = []
            for n, prompt in enumerate(prompts, 1):
                started = time.perf_counter()
                ids = prompt_token_ids(prompt, tok)
                k = None if len(ids) <= full_logits_max_tokens else top_k
                keep = prompt["name"] in wanted and k is None
                if prompt["name"] in wanted and activations is not True and not keep:
                    raise ValueError(f"prompt {prompt['name']!r}: {len(ids)} tokens is over "
                                     f"full_logits_max_tokens ({full_logits_max_tokens}); "
                                     f"activations are stored only with full logits")
                result = run_prompt(model, ids, new_tokens=new_tokens, top_k=k, activations=keep)
                for key, array in result.items():
                    add_array(npz, f"{prompt['name']}/{key}", array)
                entries.append({**prompt, "token_ids": [int(i) for i in ids],
                                "logits": "full" if k is None else f"top{k}", "activations": keep})
                if progress:
                    stored = "full logits" if k is None else f"last logits + top-{k}"
                    progress(f"[{n}/{len(prompts)}] {prompt['name']}: {len(ids)} tokens, {stored}, "
                             f"{len(result['greedy'])} greedy tokens "
                             f"({time.perf_counter() - started:.1f} s)")
        meta = golden_meta(model, input_hashes(weights, tokenizer), entries, new_tokens=new_tokens,
                           logits={"full_logits_max_tokens": full_logits_max_tokens,
                                   "top_k": top_k},
                           tolerances={"logits_atol": atol, "logits_rtol": rtol,
                                       "activation_rel": activation_tol})
        with open(os.path.join(tmp, "golden.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
            f.write("\n")
    return out


def golden_meta(model, files, prompts, *, new_tokens, logits, tolerances):
    """The contents of golden.json."""
    from . import __version__

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
        raise ValueError(f"activations: no prompt named {unknown[0]!r} "
                         f"(prompts: {', '.join(names)})")
    return set(activations)


# ----------------------------------------------------------------------------------------------
# Reading a golden


class Golden:
    """A golden directory: `meta` is golden.json, `arrays` the {name: array} of golden.npz."""

    def __init__(self, path, meta, arrays):
        self.path, self.meta, self.arrays = path, meta, arrays

    @property
    def prompts(self):
        return self.meta["prompts"]

    def token_ids(self):
        """{prompt name: token ids [T]} — all another implementation needs as input."""
        return {p["name"]: np.asarray(p["token_ids"]) for p in self.prompts}

    def prompt_arrays(self, name):
        """{array name: array} stored for one prompt ("logits", "greedy", activations, ...)."""
        prefix = name + "/"
        return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}

    @property
    def tolerances(self):
        return self.meta["tolerances"]


def load(path):
    """Read a golden directory (golden.json + golden.npz) into a Golden."""
    meta_path, npz_path = os.path.join(path, "golden.json"), os.path.join(path, "golden.npz")
    for p in (meta_path, npz_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p}: missing; a golden directory holds golden.json and "
                                    f"golden.npz (written by `minigemma golden record`)")
    with open(meta_path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} version "
                         f"{meta.get('format_version')!r}; this minigemma reads {FORMAT!r} "
                         f"version {FORMAT_VERSION}")
    with np.load(npz_path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return Golden(path, meta, arrays)


# ----------------------------------------------------------------------------------------------
# Comparing logits against a golden


@dataclass
class PromptResult:
    name: str
    n_tokens: int
    max_abs: float          # max |ours - golden| over the stored logits
    max_rel: float          # max_abs / max |golden|: logits near zero make elementwise ratios noise
    passed: bool            # every stored logit within atol + rtol * |golden|
    greedy_compared: bool = False
    first_greedy_diff: int | None = None  # index of the first differing greedy token
    problem: str = ""       # a shape or length mismatch, instead of numbers


@dataclass
class Report:
    atol: float
    rtol: float
    results: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # not tied to one prompt (e.g. weight hashes)

    @property
    def passed(self):
        return not self.problems and all(r.passed for r in self.results)

    def __str__(self):
        lines = [f"{'prompt':<24} {'tokens':>6} {'max|d|':>10} {'max rel':>10} {'greedy':>12}  "
                 f"result"]
        for r in self.results:
            greedy = ("-" if not r.greedy_compared else "same" if r.first_greedy_diff is None
                      else f"differs @{r.first_greedy_diff}")
            if r.problem:
                lines.append(f"{r.name:<24} {r.n_tokens:>6} {'-':>10} {'-':>10} {'-':>12}  "
                             f"FAIL: {r.problem}")
            else:
                lines.append(f"{r.name:<24} {r.n_tokens:>6} {r.max_abs:>10.3g} {r.max_rel:>10.3g} "
                             f"{greedy:>12}  {'pass' if r.passed else 'FAIL'}")
        lines += [f"FAIL: {p}" for p in self.problems]
        n_ok = sum(r.passed for r in self.results)
        lines.append(f"{n_ok}/{len(self.results)} prompts within atol={self.atol:g}, "
                     f"rtol={self.rtol:g}: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


def at_stored_positions(stored, logits):
    """Reduce logits [T, V] to what the golden stores: all of it, or the last row plus the
    logits at the golden's top-k ids of every row. -> {array name: array}"""
    if "logits" in stored:
        return {"logits": logits}
    return {"last_logits": logits[-1],
            "topk_logits": np.take_along_axis(logits, stored["topk_ids"].astype(np.int64), -1)}


def compare_prompt(name, stored, ours, atol, rtol, greedy=None):
    """One PromptResult from the golden's arrays and ours, both reduced by at_stored_positions."""
    T = len(stored["tokens"])
    for key in ours:
        want, got = stored[key].shape, np.shape(ours[key])
        if want != got:
            return PromptResult(name, T, np.inf, np.inf, False,
                                problem=f"{key} has shape {got}, the golden's has {want}")
    expected = np.concatenate([stored[k].ravel() for k in ours]).astype(np.float64)
    actual = np.concatenate([np.asarray(ours[k]).ravel() for k in ours]).astype(np.float64)
    err = np.abs(actual - expected)
    max_abs = float(err.max())
    passed = bool(np.all(err <= atol + rtol * np.abs(expected)))  # NaN fails too
    first = None
    if greedy is not None:
        want, got = stored["greedy"], np.asarray(greedy)
        n = min(len(want), len(got))
        diffs = np.flatnonzero(want[:n] != got[:n])
        first = int(diffs[0]) if len(diffs) else (None if len(got) >= len(want) else len(got))
        passed = passed and first is None
    return PromptResult(name, T, max_abs, max_abs / max(float(np.abs(expected).max()), 1e-30),
                        passed, greedy is not None, first)


def compare(golden, logits_by_prompt, *, greedy_by_prompt=None, atol=None, rtol=None):
    """Compare another implementation's logits with a golden -> Report.

    logits_by_prompt: {prompt name: logits [T, V]} for the golden's token ids (golden.token_ids());
    prompts left out are not compared. greedy_by_prompt (optional): {prompt name: greedy token ids}.
    atol, rtol default to the golden's recorded tolerances. Passing means, elementwise,
    |logits - golden| <= atol + rtol * |golden| and, if given, identical greedy tokens.
    """
    atol = golden.tolerances["logits_atol"] if atol is None else atol
    rtol = golden.tolerances["logits_rtol"] if rtol is None else rtol
    report = Report(atol, rtol)
    known = {p["name"] for p in golden.prompts}
    unknown = sorted(set(logits_by_prompt) - known)
    if unknown:
        raise ValueError(f"{golden.path}: no prompt named {unknown[0]!r} in the golden "
                         f"(it has {', '.join(sorted(known))})")
    for p in golden.prompts:
        if p["name"] not in logits_by_prompt:
            continue
        stored = golden.prompt_arrays(p["name"])
        logits = np.asarray(logits_by_prompt[p["name"]])
        greedy = (greedy_by_prompt or {}).get(p["name"])
        if logits.ndim != 2 or logits.shape[0] != len(stored["tokens"]):
            report.results.append(PromptResult(
                p["name"], len(stored["tokens"]), np.inf, np.inf, False,
                problem=f"logits have shape {logits.shape}, expected [{len(stored['tokens'])}, V] "
                        f"(one row per prompt token; check BOS)"))
            continue
        ours = at_stored_positions(stored, logits)
        report.results.append(compare_prompt(p["name"], stored, ours, atol, rtol, greedy))
    return report


def assert_matches(golden, logits_by_prompt, **kwargs):
    """compare(...) for tests: raises AssertionError with the report table unless it passes."""
    report = compare(golden, logits_by_prompt, **kwargs)
    if not report.results:
        raise AssertionError("no prompt of the golden was compared")
    if not report.passed:
        raise AssertionError(f"logits differ from the golden {golden.path}:\n{report}")
    return report


# ----------------------------------------------------------------------------------------------
# Checking minigemma itself against a golden


def check(path, weights, *, atol=None, rtol=None, progress=None):
    """Re-run the golden's prompts through minigemma on `weights` with the recorded precision
    recipe and compare logits and greedy tokens -> Report (also checks the weight hashes)."""
    from . import load as load_model

    golden = load(path)
    meta = golden.meta
    precision = meta["precision"]
    model = load_model(weights, dtype=np.dtype(precision["compute_dtype"]),
                       normalizer=precision["normalizer"])
    atol = golden.tolerances["logits_atol"] if atol is None else atol
    rtol = golden.tolerances["logits_rtol"] if rtol is None else rtol
    report = Report(atol, rtol)
    for name, digest in meta["files"].items():
        local = os.path.join(weights, name)
        if name == "tokenizer.model":  # token ids are in the golden; the tokenizer plays no part
            continue
        if not os.path.exists(local) or sha256_file(local) != digest:
            report.problems.append(f"{local} is not the file the golden was recorded from "
                                   f"(sha256 differs or file missing)")
    for n, p in enumerate(golden.prompts, 1):
        stored = golden.prompt_arrays(p["name"])
        ours, greedy = rerun_prompt(model, p["token_ids"], stored)
        result = compare_prompt(p["name"], stored, ours, atol, rtol, greedy=greedy)
        report.results.append(result)
        if progress:
            progress(f"[{n}/{len(golden.prompts)}] {p['name']}: max|d| {result.max_abs:.3g} "
                     f"{'pass' if result.passed else 'FAIL'}")
    return report


def rerun_prompt(model, ids, stored):
    """minigemma's logits reduced to what the golden stores, and its greedy continuation.

    For a top-k golden, the logits are taken at the golden's top-k ids (minigemma's own top-k
    could order near-ties differently), CHUNK tokens at a time."""
    cache = model.new_cache(min(len(ids) + len(stored["greedy"]), model.config.max_positions))
    if "logits" in stored:
        logits = model.forward(ids, cache).astype(np.float32)
        ours = {"logits": logits}
    else:
        rows = []
        for start, logits in prefill_in_chunks(model, ids, cache):
            top_ids = stored["topk_ids"][start:start + len(logits)].astype(np.int64)
            rows.append(np.take_along_axis(logits, top_ids, -1))
        ours = {"last_logits": logits[-1], "topk_logits": np.concatenate(rows)}
    greedy = greedy_continuation(model, logits[-1], cache, cache.max_len - len(ids))
    return ours, greedy


# ----------------------------------------------------------------------------------------------
# Command line: `minigemma golden record | check | diff`


def add_parser(subparsers):
    """Register `golden record|check|diff` on the CLI's subparsers."""
    golden = subparsers.add_parser("golden", help="record, check and compare golden outputs")
    commands = golden.add_subparsers(dest="golden_command", required=True)

    rec = commands.add_parser("record", help="run prompts through minigemma, write a golden")
    rec.add_argument("--weights", required=True, help="checkpoint directory")
    rec.add_argument("--prompts", required=True, help="prompts .jsonl (name + text|chat|ids)")
    rec.add_argument("--out", required=True, help="golden directory to create")
    rec.add_argument("--tokenizer", help="tokenizer.model (default: WEIGHTS/tokenizer.model)")
    rec.add_argument("--activations", nargs="*", metavar="PROMPT",
                     help="also store every named activation, for the named prompts or (no names) "
                          "every prompt whose logits are stored in full")
    rec.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="greedy tokens to record")
    rec.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    rec.add_argument("--normalizer", choices=["exact", "bf16"], default="exact")
    rec.add_argument("--full-logits-max-tokens", type=int, default=FULL_LOGITS_MAX_TOKENS,
                     help="longer prompts store last-row logits + top-k per position")
    rec.add_argument("--top-k", type=int, default=TOP_K)
    rec.add_argument("--atol", type=float, default=ATOL, help="recommended logits atol")
    rec.add_argument("--rtol", type=float, default=RTOL, help="recommended logits rtol")
    rec.add_argument("--activation-tol", type=float, default=ACTIVATION_TOL,
                     help="recommended max |error| / max |golden| per activation point")
    rec.add_argument("--force", action="store_true", help="replace an existing golden")
    rec.set_defaults(run=run_record)

    chk = commands.add_parser("check", help="re-compute a golden with minigemma and compare")
    chk.add_argument("golden", help="golden directory")
    chk.add_argument("--weights", required=True, help="checkpoint directory")
    chk.add_argument("--atol", type=float, help="default: the golden's recorded tolerance")
    chk.add_argument("--rtol", type=float, help="default: the golden's recorded tolerance")
    chk.set_defaults(run=run_check)

    dif = commands.add_parser("diff", help="find where another implementation's activations "
                                           "diverge from a golden recorded with --activations")
    dif.add_argument("golden", help="golden directory")
    dif.add_argument("other", help=".npz of activations named '<prompt>/<point>'")
    dif.add_argument("--prompt", help="only this prompt")
    dif.add_argument("--tol", type=float, help="max |error| / max |golden| allowed at a point "
                                               "(default: the golden's activation_rel)")
    dif.set_defaults(run=run_diff)


def stderr(line):
    print(line, file=sys.stderr, flush=True)


def run_record(args):
    # SIGTERM (e.g. a CI timeout) should unwind like Ctrl-C, so the temporary directory is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # --activations alone: every full-logits prompt; with names: those prompts; absent: none
    activations = True if args.activations == [] else (args.activations or False)
    record(args.weights, args.prompts, args.out, tokenizer=args.tokenizer,
           activations=activations, new_tokens=args.new_tokens, dtype=np.dtype(args.dtype),
           normalizer=args.normalizer, full_logits_max_tokens=args.full_logits_max_tokens,
           top_k=args.top_k, atol=args.atol, rtol=args.rtol,
           activation_tol=args.activation_tol, overwrite=args.force,
           progress=stderr)
    stderr(f"wrote {args.out}/golden.json and golden.npz")
    return 0


def run_check(args):
    report = check(args.golden, args.weights, atol=args.atol, rtol=args.rtol, progress=stderr)
    print(report)
    return 0 if report.passed else 1


def run_diff(args):
    from .divergence import diff
    report = diff(load(args.golden), args.other, prompt=args.prompt, tol=args.tol)
    print(report)
    return 0 if report.first is None else 1
