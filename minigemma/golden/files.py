"""The golden format: golden.json + golden.npz, read and written all-or-nothing.

A golden is a directory of two files that any language can read without minigemma (the format is
documented in tests/conformance/README.md):

    golden.json   format version, minigemma version, model config, precision recipe, sha256 of
                  the weight files and the tokenizer, the prompts and their token ids, generation
                  settings, recommended tolerances, and the sha256 of every array of golden.npz
    golden.npz    per prompt "<prompt>/<array>": token ids, logits at every position (or, for long
                  prompts, the full last-position logits plus the top-k ids/logits of every
                  position), the greedy continuation, and optionally the named activations
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np

from ..errors import (CheckpointNotFoundError, GoldenError, GoldenNotFoundError, GoldenWriteError,
                      OutputExistsError)
from ..uninterrupted import held_signals

FORMAT = "minigemma-golden"
FORMAT_VERSION = 1
# golden.json's "array_sha256": {array name: sha256 of its .npy file inside golden.npz}. Goldens
# recorded before it existed have none, and load without that check.
CHECKSUMS = "array_sha256"


# Files: sha256 of the inputs, a reproducible .npz, and an all-or-nothing golden directory.


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_files(weights):
    """{name: path} of the files a golden's weights are identified by: for a checkpoint
    directory its config.json, safetensors files and index, .ckpt and .gguf files; for a
    checkpoint file, that file."""
    if os.path.isfile(weights):
        return {os.path.basename(weights): weights}
    if not os.path.isdir(weights):
        raise CheckpointNotFoundError(f"{weights}: not a checkpoint directory or file")
    names = sorted(n for n in os.listdir(weights)
                   if n == "config.json" or n.endswith((".safetensors", ".ckpt", ".gguf"))
                   or n == "model.safetensors.index.json")
    return {n: os.path.join(weights, n) for n in names}


def input_hashes(weights, tokenizer_path):
    """{file name: sha256} of the weight files (input_files) and the tokenizer."""
    hashes = {name: sha256_file(path) for name, path in input_files(weights).items()}
    if tokenizer_path:
        hashes["tokenizer.model"] = sha256_file(tokenizer_path)
    return hashes


class _Hashing:
    """A write-only file that passes bytes on to `f` and hashes them on the way."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data):
        self.sha256.update(data)
        return self.f.write(data)


def add_array(npz, name, array):
    """Add one array to an open .npz (a zip of .npy files), as np.savez would, but with a fixed
    timestamp so that equal arrays give equal bytes. Returns the sha256 of the .npy bytes, which
    golden.json records (CHECKSUMS) so that load() can tell a damaged or edited array."""
    info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    with npz.open(info, "w", force_zip64=True) as f:
        out = _Hashing(f)
        np.lib.format.write_array(out, np.asarray(array), allow_pickle=False)
    return out.sha256.hexdigest()


@contextlib.contextmanager
def golden_directory(out, overwrite=False):
    """Yield a temporary directory beside `out`, which takes the place of `out` when the block
    completes and is removed if it does not: an interrupted or failed run (Ctrl-C, a full disk)
    leaves nothing at `out`, and a golden already there intact."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise OutputExistsError(f"{out}: already exists (remove it, or --force to replace it)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = None
    try:
        with held_signals():  # so that a Ctrl-C finds `tmp` set, and it is removed below
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-",
                                   dir=os.path.dirname(out))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a golden is meant to be shared
        try:
            yield tmp
            _sync(tmp)
        except OSError as e:
            raise GoldenWriteError(f"{out}: writing failed ({e.strerror or e}); nothing was "
                                   f"written there") from e
        _replace(tmp, out)
    finally:
        with held_signals():
            if tmp is not None and os.path.exists(tmp):
                shutil.rmtree(tmp)


def _sync(directory):
    """Force the files of `directory`, and the directory itself, onto the disk: renamed into place
    afterwards, a golden is complete even after a power cut."""
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp, out):
    """Rename `tmp` to `out`. An existing `out` is first renamed to previous_path(out), and removed
    once `tmp` is in its place. Ctrl-C and SIGTERM wait until that is done (held_signals): only a
    SIGKILL between the two renames, microseconds apart, can leave the old golden under its
    backup name (where load() points to it)."""
    backup = previous_path(out)
    with held_signals():
        if os.path.exists(out):
            if os.path.exists(backup):  # left by an earlier run; `out` is newer
                shutil.rmtree(backup)
            os.rename(out, backup)
        os.rename(tmp, out)
        if os.path.exists(backup):  # ours, or the only golden an earlier run left: replaced now
            shutil.rmtree(backup)


def previous_path(out):
    """Where _replace keeps the golden it replaces, until the new one is in place."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.previous")


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
        return arrays_of(self.arrays, name)

    @property
    def tolerances(self):
        return self.meta["tolerances"]


# The keys of golden.json that checking a golden relies on.
REQUIRED = ("model", "precision", "files", "tolerances", "prompts")


def load(path):
    """Read a golden directory (golden.json + golden.npz) into a Golden, checking every array
    against the sha256 golden.json records for it."""
    meta_path, npz_path = os.path.join(path, "golden.json"), os.path.join(path, "golden.npz")
    for p in (meta_path, npz_path):
        if not os.path.isfile(p):
            previous = previous_path(path)
            hint = (f"; the golden it replaced is at {previous} (a `golden record --force` was "
                    f"killed while swapping them)" if os.path.isdir(previous) else "")
            raise GoldenNotFoundError(f"{p}: missing; a golden directory holds golden.json and "
                                      f"golden.npz (written by `minigemma golden record`){hint}")
    meta = read_meta(meta_path)
    checksums = meta.get(CHECKSUMS)
    if checksums is not None and not isinstance(checksums, dict):
        raise GoldenError(f"{meta_path}: {CHECKSUMS} is not a JSON object; the file is damaged")
    arrays = read_arrays(npz_path, checksums)
    for p in meta["prompts"]:
        stored = {"tokens", "greedy", "logits"} if p.get("logits") == "full" else \
            {"tokens", "greedy", "last_logits", "topk_ids", "topk_logits"}
        lacking = sorted(stored - set(arrays_of(arrays, p["name"])))
        if lacking:
            raise GoldenError(f"{npz_path}: prompt {p['name']!r} lacks its {lacking[0]} array")
    return Golden(path, meta, arrays)


def arrays_of(arrays, prompt):
    """{array name: array} stored for one prompt."""
    prefix = prompt + "/"
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def read_meta(meta_path):
    """golden.json, checked to be a golden of the format version this minigemma reads."""
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise GoldenError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise GoldenError(f"{meta_path}: not a JSON object, so not a golden")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise GoldenError(f"{meta_path}: format {meta.get('format')!r} version "
                          f"{meta.get('format_version')!r}; this minigemma reads {FORMAT!r} "
                          f"version {FORMAT_VERSION}")
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise GoldenError(f"{meta_path}: lacks {', '.join(missing)}; the file is damaged")
    problem = meta_problem(meta)
    if problem:
        raise GoldenError(f"{meta_path}: {problem}; the file is damaged")
    return meta


def meta_problem(meta):
    """What is wrong with the parts of golden.json that checking a golden reads, or None."""
    precision, tolerances, prompts = meta["precision"], meta["tolerances"], meta["prompts"]
    if not isinstance(precision, dict) or precision.get("compute_dtype") not in (
            "float32", "float64") or precision.get("normalizer") not in ("exact", "bf16"):
        return f"precision {precision!r} is not a recipe (compute_dtype, normalizer)"
    if not isinstance(tolerances, dict) or not all(
            isinstance(tolerances.get(k), (int, float)) for k in ("logits_atol", "logits_rtol")):
        return f"tolerances {tolerances!r} lack logits_atol and logits_rtol"
    if not isinstance(meta["model"], dict) or not isinstance(meta["model"].get("n_layers"), int):
        return "model lacks n_layers"
    if not isinstance(meta["files"], dict):
        return "files is not a JSON object"
    if not isinstance(prompts, list) or not prompts:
        return "prompts is not a non-empty list"
    for p in prompts:
        if not (isinstance(p, dict) and isinstance(p.get("name"), str)
                and isinstance(p.get("token_ids"), list) and p["token_ids"]
                and all(isinstance(i, int) and i >= 0 for i in p["token_ids"])):
            return f"prompt {p!r} lacks a name and token_ids"
    return None


def read_arrays(npz_path, checksums):
    """{name: array} of golden.npz; with checksums ({name: sha256}), every array is checked and
    none may be missing or extra."""
    arrays = {}
    try:
        with zipfile.ZipFile(npz_path) as npz:
            for info in npz.infolist():
                raw = npz.read(info)  # zipfile checks each entry's CRC-32
                name = info.filename.removesuffix(".npy")
                if checksums is not None and hashlib.sha256(raw).hexdigest() != checksums.get(name):
                    why = ("is not in golden.json's checksums" if name not in checksums
                           else "does not match its sha256 in golden.json")
                    raise GoldenError(f"{npz_path}: array {name} {why}; the golden was changed "
                                      f"or damaged after it was recorded")
                arrays[name] = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    except GoldenError:
        raise
    except Exception as e:  # zipfile and numpy raise many kinds on a damaged file: one clear line
        raise GoldenError(f"{npz_path}: cannot be read ({type(e).__name__}: {e}); the file is "
                          f"damaged") from None
    if checksums is not None and set(checksums) - set(arrays):
        raise GoldenError(f"{npz_path}: array {sorted(set(checksums) - set(arrays))[0]} recorded "
                          f"in golden.json is missing")
    return arrays
