"""llama.cpp as a peer, on files its own tools wrote: a tiny seeded random Gemma saved by
transformers' save_pretrained, converted to GGUF (f32, q8_0) by llama.cpp's convert_hf_to_gguf.py
and quantized (Q6_K, Q4_K_M, Q4_0) by llama.cpp's own quantizer.

    (a) llama.cpp on the f32 GGUF reproduces minigemma's golden of the same weights: the logits
        within a measured tolerance, the greedy tokens exactly;
    (b) the KL report against minigemma on the original weights orders the files as their bits
        do: f32 < Q8_0 < Q6_K < Q4_K_M < Q4_0;
    (c) against minigemma reading the same quantized GGUF (minigemma.formats.gguf), llama.cpp's
        own error is what its arithmetic adds: about the same for every quantized type, and far
        below the 4-bit types' quantization error.

Where llama.cpp's arithmetic differs from minigemma's float32 (ggml-cpu, read in
github.com/ggml-org/llama.cpp): GELU is looked up in a float16 table (GGML_GELU_FP16, the input
rounded to float16), the KV cache is float16 by default, and a quantized matrix multiplies
activations quantized to 8 bits (Q8_0 or Q8_K blocks): 8-bit activations cost about as much as
8-bit weights, so on a Q8_0 file half of the KL against the original weights is llama.cpp's own.
Skipped only when llama_cpp does not import (it is an optional peer; CI installs it).
"""

import ast
import ctypes
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: the optional llama.cpp peer "
                        "(pip install llama-cpp-python==0.3.36) is not tested")

import minigemma  # noqa: E402
from minigemma import golden, kl, llama_cpp_peer  # noqa: E402
from minigemma.checkpoint import check_weights  # noqa: E402
from minigemma.config import from_hf_config  # noqa: E402
from minigemma.formats import gguf  # noqa: E402
from hf_peer import random_gemma, save_checkpoint  # noqa: E402
from llama_cpp_tools import convert_hf_to_gguf  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
CONFORMANCE = os.path.join(REPO, "tests", "conformance")
TOKENIZER = os.path.join(CONFORMANCE, "checkpoints", "tiny-mqa", "tokenizer.model")

# Multi-query like 2B, with N*H (4 * 128 = 512) != D (256). D and F are multiples of 256 so that
# every matrix row splits into whole K-quant super-blocks (256 weights): no fallback types.
CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=1, head_dim=128)
# With the tied output embedding, a residual stream dominated by the token's own (scaled)
# embedding makes every next-token distribution one-hot on the input token (entropy ~0 nats), and
# any KL ~0 whatever the error. Larger embeddings and o_proj / down_proj x10 let the blocks
# dominate: mean entropy ~1.6 nats, the top token at p ~0.6 on average, as in a trained model.
EMBED_STD, OUTPUT_GAIN = 0.2, 10.0
QUANTIZED = {"Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
             "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The tiny Gemma, float32, written by save_pretrained, with the conformance tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-gemma")
    model = random_gemma(CONFIG, seed=10, embed_std=EMBED_STD)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(OUTPUT_GAIN)
    save_checkpoint(model, directory)
    shutil.copy(TOKENIZER, directory / "tokenizer.model")
    return str(directory)


def quantize(source, out, ftype_name):
    """llama.cpp's own quantizer (llama-quantize's library call) with its default parameters."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    llama_cpp.llama_backend_init()
    if llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize({source} -> {ftype_name}) failed")
    return out


@pytest.fixture(scope="module")
def ggufs(hf_dir, tmp_path_factory):
    """{type: GGUF path}: F32 and Q8_0 by the converter, the rest quantized from the F32 file."""
    directory = tmp_path_factory.mktemp("gguf")
    files = {kind: convert_hf_to_gguf(hf_dir, str(directory / f"tiny-{kind}.gguf"), outtype)
             for kind, outtype in (("F32", "f32"), ("Q8_0", "q8_0"))}
    for kind, ftype in QUANTIZED.items():
        files[kind] = quantize(files["F32"], str(directory / f"tiny-{kind}.gguf"), ftype)
    return files


@pytest.fixture(scope="module")
def recorded(hf_dir, tmp_path_factory):
    """minigemma's golden of the conformance prompts on the save_pretrained weights ("long", 300
    tokens, is stored in the top-k form)."""
    out = str(tmp_path_factory.mktemp("golden") / "tiny")
    return golden.record(hf_dir, os.path.join(CONFORMANCE, "prompts.jsonl"), out)


@pytest.fixture(scope="module")
def llama(ggufs, recorded):
    """llama.cpp's arrays per (GGUF type, KV cache type), computed once each."""
    prompts, new_tokens = llama_cpp_peer.read_golden_inputs(recorded)
    cache = {}

    def run(kind, kv_cache="f16"):
        if (kind, kv_cache) not in cache:
            cache[kind, kv_cache] = llama_cpp_peer.run(ggufs[kind], prompts, new_tokens,
                                                       kv_cache=kv_cache)
        return cache[kind, kv_cache]
    return run


def logits_of(results):
    return {name: r["logits"] for name, r in results.items()}


def minigemma_logits(model, prompts):
    """{prompt: minigemma's logits [T, V]} for {prompt: token ids}."""
    return {name: model.forward(np.asarray(ids)).astype(np.float32)
            for name, ids in prompts.items()}


def minigemma_on_gguf(path):
    """minigemma on a GGUF file, read by minigemma's own GGUF reader (quantized tensors stay
    quantized and are dequantized by minigemma, a block of rows at a time)."""
    hf_config, tensors = gguf.read(path)
    config = from_hf_config(hf_config, source=path)
    check_weights(tensors, config, path)
    return minigemma.Gemma(config, tensors)


# ----------------------------------------------------------------------------------------------
# (a) llama.cpp on the f32 GGUF against minigemma's golden of the same weights

# Measured max |dlogit| (llama-cpp-python 0.3.36, AVX2 build); greedy tokens identical in all:
#                               f32 GGUF, f32 KV   f32 GGUF, f16 KV   bf16 GGUF, f16 KV
#   tiny (logits up to 19)           6.5e-3            1.1e-2                -
#   conformance tiny-mqa             1.5e-3            2.4e-3              2.2e-2
#   conformance tiny-mha             3.1e-3            3.4e-3              2.1e-2
# With a float32 KV cache the difference is llama.cpp's float16 GELU table alone; a bf16 GGUF
# also rounds the activations to bfloat16 in every matmul (ggml's BF16 dot product). A Q8_0 file
# is off by 0.2-0.6.
ATOL = {("f32", "f32"): 2e-2, ("f32", "f16"): 3e-2, ("bf16", "f16"): 6e-2}


def check_against_golden(golden_dir, results, atol):
    g = golden.load(golden_dir)
    report = golden.compare(g, logits_of(results),
                            greedy_by_prompt={n: r["greedy"] for n, r in results.items()},
                            atol=atol, rtol=0)
    print(report)
    assert len(report.results) == len(g.prompts) and report.passed, str(report)


@pytest.mark.parametrize("kv_cache", ["f32", "f16"])
def test_llama_cpp_f32_gguf_matches_the_golden(llama, recorded, kv_cache):
    check_against_golden(recorded, llama("F32", kv_cache), ATOL["f32", kv_cache])


@pytest.mark.parametrize("outtype, kv_cache", [("f32", "f32"), ("bf16", "f16")])
@pytest.mark.parametrize("name", ["tiny-mqa", "tiny-mha"])
def test_llama_cpp_matches_the_committed_goldens(name, outtype, kv_cache, tmp_path):
    """The conformance pack's own checkpoints (bfloat16 safetensors) and goldens."""
    path = convert_hf_to_gguf(os.path.join(CONFORMANCE, "checkpoints", name),
                              str(tmp_path / f"{name}-{outtype}.gguf"), outtype)
    golden_dir = os.path.join(CONFORMANCE, "goldens", name)
    prompts, new_tokens = llama_cpp_peer.read_golden_inputs(golden_dir)
    results = llama_cpp_peer.run(path, prompts, new_tokens, kv_cache=kv_cache)
    check_against_golden(golden_dir, results, ATOL[outtype, kv_cache])


def test_the_tolerance_tells_q8_0_from_f32(llama, recorded):
    """The loosest tolerance is not so loose that 8-bit weights pass it, on any prompt."""
    report = golden.compare(golden.load(recorded), logits_of(llama("Q8_0")),
                            atol=max(ATOL.values()), rtol=0)
    assert not any(r.passed for r in report.results), str(report)


def test_cli_writes_the_golden_layout(ggufs, recorded, tmp_path):
    """The adapter as a command, run as a file under -I (nothing of minigemma on the path)."""
    out = str(tmp_path / "llama.npz")
    done = subprocess.run([sys.executable, "-I", llama_cpp_peer.__file__, recorded, ggufs["F32"],
                           out, "--kv-cache", "f32", "--threads", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stderr
    npz = np.load(out)
    g = golden.load(recorded)
    expected = {f"{p['name']}/{key}" for p in g.prompts for key in ("tokens", "logits", "greedy")}
    assert set(npz.files) == expected
    for name, ids in g.token_ids().items():
        assert npz[f"{name}/logits"].shape == (len(ids), 512)
        assert npz[f"{name}/logits"].dtype == np.float32
        np.testing.assert_array_equal(npz[f"{name}/tokens"], ids)
        np.testing.assert_array_equal(npz[f"{name}/greedy"], g.prompt_arrays(name)["greedy"])
    report = golden.compare(g, kl.read_logits(out), greedy_by_prompt=kl.read_greedy(out),
                            atol=ATOL["f32", "f32"], rtol=0)
    assert report.passed, str(report)


def test_adapter_imports_only_numpy_and_the_standard_library():
    with open(llama_cpp_peer.__file__) as f:
        tree = ast.parse(f.read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))
    assert imported == {"argparse", "json", "os", "sys", "numpy", "llama_cpp"}


def test_adapter_names_bad_input(ggufs, recorded, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        llama_cpp_peer.run(str(tmp_path / "missing.gguf"), {"a": [2]}, 1)
    with pytest.raises(FileNotFoundError, match="golden.json"):
        llama_cpp_peer.read_golden_inputs(str(tmp_path))
    with pytest.raises(ValueError, match="token id 600 is outside the GGUF's vocabulary of 512"):
        llama_cpp_peer.run(ggufs["F32"], {"a": [2, 600]}, 1)
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"GGUF but not really")
    with pytest.raises(ValueError, match="not.gguf: llama.cpp could not load it"):
        llama_cpp_peer.run(str(not_gguf), {"a": [2]}, 1)


# ----------------------------------------------------------------------------------------------
# (b), (c) The KL report: quantization error against the implementation's own error


@pytest.fixture(scope="module")
def references(hf_dir, recorded):
    """minigemma's logits on the original (save_pretrained) weights, every prompt in full."""
    prompts, _ = llama_cpp_peer.read_golden_inputs(recorded)
    return minigemma_logits(minigemma.load(hf_dir), prompts)


@pytest.fixture(scope="module")
def kl_reports(ggufs, recorded, references, llama):
    """{GGUF type: KLReport of llama.cpp on that file against minigemma on the same file and
    against minigemma on the original weights}."""
    prompts, _ = llama_cpp_peer.read_golden_inputs(recorded)
    reports = {}
    for kind in ("F32", "Q8_0", "Q6_K", "Q4_K_M", "Q4_0"):
        same = minigemma_logits(minigemma_on_gguf(ggufs[kind]), prompts)
        reports[kind] = kl.report(
            logits_of(llama(kind)),
            {f"same {kind} weights": same, "original f32": references},
            title=f"llama.cpp on tiny-{kind}.gguf (float16 KV cache) against minigemma")
    return reports


def test_kl_orders_the_quantizations(kl_reports):
    """Against the original weights, mean KL grows as bits go. Measured (mean KL, nats):
    F32 1.1e-6, Q8_0 2.9e-3, Q6_K 1.9e-2, Q4_K_M 0.17, Q4_0 0.25."""
    for report in kl_reports.values():
        print(report, end="\n\n")
    print(kl.summary(kl_reports, title="llama.cpp (float16 KV cache) against minigemma, "
                                       "all 416 positions of the conformance prompts"))
    mean = {kind: r.tables["original f32"].overall.mean for kind, r in kl_reports.items()}
    assert 3 * mean["F32"] < mean["Q8_0"]
    assert 3 * mean["Q8_0"] < mean["Q6_K"]
    assert 3 * mean["Q6_K"] < mean["Q4_K_M"]
    assert mean["Q4_K_M"] < mean["Q4_0"]
    assert mean["F32"] < 1e-5


def test_llama_cpp_own_error_is_its_8_bit_activations(kl_reports):
    """(c) Against minigemma on the same file, llama.cpp's error is about the same whatever the
    weights' format (measured mean KL 1.4e-3 .. 3.6e-3: its 8-bit activations), below the
    quantization's for every type and 20x below it for the 4-bit ones (measured: Q8_0 2.1x,
    Q6_K 5.4x, Q4_K_M 48x, Q4_0 160x), and far above its error on the F32 file."""
    f32 = kl_reports["F32"].tables["same F32 weights"].overall
    for kind in ("Q8_0", "Q6_K", "Q4_K_M", "Q4_0"):
        report = kl_reports[kind]
        same = report.tables[f"same {kind} weights"].overall
        original = report.tables["original f32"].overall
        assert 100 * f32.mean < same.mean < 1e-2, str(report)
        assert same.mean < original.mean, str(report)
        if kind.startswith("Q4"):
            assert 20 * same.mean < original.mean, str(report)
            assert 3 * same.max_dlogit < original.max_dlogit, str(report)
