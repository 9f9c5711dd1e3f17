"""The conformance pack is right (transformers agrees with it), small, and reproducible.

The pack's goldens were recorded by minigemma; checking them only against minigemma would freeze
any minigemma bug into them. So every golden is cross-checked here against transformers'
GemmaForCausalLM (float32, eager attention) on the pack's own checkpoint files: logits within the
recorded tolerance (atol 1e-4 + rtol 1e-4 x |logit|; measured max |diff| <= 4e-6) and the same
greedy tokens.
"""

import io
import json
import os
import re
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest

from minigemma import golden
from minigemma.tokenizer import Tokenizer
from hf_peer import load_peer, peer_greedy, peer_logits

PACK = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(PACK, os.pardir, os.pardir)
NAMES = ["tiny-mqa", "tiny-mha"]


def pack(name):
    return os.path.join(PACK, "checkpoints", name), golden.load(os.path.join(PACK, "goldens", name))


@pytest.mark.parametrize("name", NAMES)
def test_pack_goldens_match_transformers(name):
    weights, g = pack(name)
    peer = load_peer(weights)
    new_tokens = g.meta["generation"]["new_tokens"]
    logits = {p: peer_logits(peer, ids) for p, ids in g.token_ids().items()}
    greedy = {p: peer_greedy(peer, ids, new_tokens) for p, ids in g.token_ids().items()}
    report = golden.assert_matches(g, logits, greedy_by_prompt=greedy)
    print(f"\n{name} vs transformers:\n{report}")
    assert len(report.results) == len(g.prompts) == 6
    assert max(r.max_abs for r in report.results) <= 1e-5  # float32 rounding, well inside atol


@pytest.mark.parametrize("name", NAMES)
def test_pack_goldens_match_minigemma(name):
    weights, g = pack(name)
    report = golden.check(g.path, weights)
    assert report.passed, str(report)


@pytest.mark.parametrize("name", NAMES)
def test_pack_prompts_are_the_tokenizers_ids(name):
    weights, g = pack(name)
    tok = Tokenizer(os.path.join(weights, "tokenizer.model"))
    for p in g.prompts:
        ids = p["token_ids"]
        if "text" in p:
            assert ids == tok.encode(p["text"]), p["name"]
        elif "chat" in p:
            assert ids == tok.chat_ids(p["chat"]), p["name"]
        assert ids[0] == tok.bos_id


def test_pack_is_small():
    sizes = {os.path.relpath(os.path.join(d, f), PACK): os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(PACK) for f in files if "__pycache__" not in d}
    assert max(sizes.values()) < 1 << 20, sizes
    assert sum(sizes.values()) < 2 << 20, sizes


def test_regenerate_reproduces_the_pack(tmp_path):
    sys.path.insert(0, PACK)
    import regenerate
    with redirect_stdout(io.StringIO()):
        regenerate.main(str(tmp_path))
    for name in NAMES:
        for f in ("config.json", "model.safetensors", "tokenizer.model"):
            committed = os.path.join(PACK, "checkpoints", name, f)
            assert golden.files.sha256_file(str(tmp_path / "checkpoints" / name / f)) == \
                golden.files.sha256_file(committed), f"{name}/{f} is not reproduced byte for byte"
        old, new = golden.load(os.path.join(PACK, "goldens", name)), golden.load(
            str(tmp_path / "goldens" / name))
        # A new release alone does not make the pack stale; the arrays' checksums follow their
        # float32 bits, which may differ across machines (the arrays are compared just below).
        ignored = {"minigemma_version": None, golden.files.CHECKSUMS: None}
        assert {**new.meta, **ignored} == {**old.meta, **ignored}
        assert sorted(new.arrays) == sorted(old.arrays)
        for key, array in old.arrays.items():
            if array.dtype.kind == "f":  # float32 rounding may differ across machines and BLAS
                np.testing.assert_allclose(new.arrays[key], array, atol=1e-5, rtol=0, err_msg=key)
            else:
                assert np.array_equal(new.arrays[key], array), key


def test_readme_reader_example_runs():
    """The README's NumPy-only reader, with transformers standing in for "your implementation"."""
    readme = open(os.path.join(PACK, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    reader = next(b for b in blocks if "golden.npz" in b)
    weights, _ = pack("tiny-mqa")
    peer = load_peer(weights)
    out = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        with redirect_stdout(out):
            exec(reader, {"my_logits": lambda ids: peer_logits(peer, ids)})
    finally:
        os.chdir(cwd)
    lines = out.getvalue().splitlines()
    assert len(lines) == 6 and all(line.endswith(" ok") for line in lines), out.getvalue()


def test_golden_json_is_plain_json():
    with open(os.path.join(PACK, "goldens", "tiny-mha", "golden.json")) as f:
        meta = json.load(f)
    assert meta["model"]["n_kv_heads"] == meta["model"]["n_heads"] == 4
    assert meta["precision"]["weight_storage"] == "bfloat16"
