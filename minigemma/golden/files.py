"""The golden format: golden.json + golden.npz, read and written all-or-nothing.

A golden is a directory of two files that any language can read without minigemma (the format is
documented in tests/conformance/README.md):

    golden.json   format version, minigemma version, model config, precision recipe, sha256 of
                  the weight files and the tokenizer, the prompts and their token ids, generation
                  settings, recommended tolerances
    golden.npz    per prompt "<prompt>/<array>": token ids, logits at every position (or, for long
                  prompts, the full last-position logits plus the top-k ids/logits of every
                  position), the greedy continuation, and optionally the named activations
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np

FORMAT = "minigemma-golden"
FORMAT_VERSION = 1


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

