"""The divergence finder on a real independent implementation: transformers' GemmaForCausalLM.

Activations are dumped by scripts/dump_hf_activations.py (forward hooks) and compared with the
conformance pack's goldens (recorded by minigemma with activations of the "chat" prompt). The
correct model stays within the recorded tolerance everywhere (max rel err 1e-5 per point;
measured <= 1.1e-6); each classic Gemma porting bug, planted in a copy of the transformers model,
must be named at the first point it touches.
"""

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from transformers.models.gemma import modeling_gemma

from minigemma import golden
from minigemma.golden import diff
from hf_peer import load_peer

REPO = os.path.join(os.path.dirname(__file__), os.pardir)
PACK = os.path.join(os.path.dirname(__file__), "conformance")
sys.path.insert(0, os.path.join(REPO, "scripts"))
import dump_hf_activations  # noqa: E402

CHECKPOINTS = ["tiny-mqa", "tiny-mha"]


def pack(name):
    return os.path.join(PACK, "checkpoints", name), golden.load(os.path.join(PACK, "goldens", name))


def chat_ids(g):
    return {"chat": g.token_ids()["chat"]}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_transformers_activations_agree_with_the_golden_everywhere(name):
    weights, g = pack(name)
    report = diff(g, dump_hf_activations.dump(load_peer(weights), chat_ids(g)))
    assert report.first is None, str(report)
    assert [r.point for r in report.rows] == g.meta["activation_points"]
    assert max(r.rel for r in report.rows) <= 3e-6  # float32 rounding; measured 1.0e-6
    assert "no divergence" in report.diagnosis


# ----------------------------------------------------------------------------------------------
# Planted bugs: each function breaks a freshly loaded transformers model (or its input) the way a
# port of Gemma once went wrong.


def exact_gelu(model, monkeypatch):
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU(approximate="none")  # erf, not tanh


def rms_norm_without_plus_one(model, monkeypatch):
    def times_w(self, x):  # x / rms * w instead of * (1 + w)
        return (self._norm(x.float()) * self.weight.float()).type_as(x)
    for module in model.modules():
        if isinstance(module, modeling_gemma.GemmaRMSNorm):
            module.forward = types.MethodType(times_w, module)


def interleaved_rope(model, monkeypatch):
    def apply(q, k, cos, sin, unsqueeze_dim=1):  # rotate pairs (2i, 2i+1), not (i, i + H/2)
        half = q.shape[-1] // 2
        c, s = cos.unsqueeze(unsqueeze_dim)[..., :half], sin.unsqueeze(unsqueeze_dim)[..., :half]

        def rotate(x):
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)
        return rotate(q), rotate(k)
    monkeypatch.setattr(modeling_gemma, "apply_rotary_pos_emb", apply)


def bf16_normalizer(model, monkeypatch):
    scale = model.model.embed_tokens.embed_scale
    scale.fill_(scale.to(torch.bfloat16).item())  # sqrt(48) 6.928 -> 6.9375, sqrt(40) -> 6.3125


BUGS = {
    "exact erf GELU": (exact_gelu, "layers.0.ffn_out", "tanh-approximate GELU"),
    "RMSNorm without +1": (rms_norm_without_plus_one, "layers.0.attn_norm", "(1 + w)"),
    "interleaved RoPE": (interleaved_rope, "layers.0.q_rope", "check RoPE layout"),
    "bf16-rounded normalizer": (bf16_normalizer, "embed", "embedding scale sqrt(D)"),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("bug", list(BUGS))
def test_finder_names_the_planted_bug(name, bug, monkeypatch):
    weights, g = pack(name)
    plant, point, hint = BUGS[bug]
    model = load_peer(weights)
    plant(model, monkeypatch)
    report = diff(g, dump_hf_activations.dump(model, chat_ids(g)))
    assert report.first is not None and report.first.point == point, str(report)
    assert hint in report.diagnosis
    assert report.first.rel > 10 * g.tolerances["activation_rel"]  # a jump, not noise


@pytest.mark.parametrize("with_tokens", [True, False])
def test_finder_names_a_missing_bos(with_tokens):
    weights, g = pack("tiny-mqa")
    ids = g.token_ids()["chat"]
    assert ids[0] == 2
    dumped = dump_hf_activations.dump(load_peer(weights), {"chat": ids[1:]})
    if not with_tokens:  # an implementation that dumps activations only
        del dumped["chat/tokens"]
    report = diff(g, dumped)
    assert report.first.point == "embed"
    assert "check BOS" in report.diagnosis
    expected = ("token ids lack the golden's first token 2" if with_tokens
                else f"{len(ids) - 1} positions, the golden has {len(ids)}")
    assert expected in report.diagnosis


def test_finder_accepts_flattened_heads_and_a_batch_axis():
    weights, g = pack("tiny-mqa")
    dumped = dump_hf_activations.dump(load_peer(weights), chat_ids(g))
    dumped["chat/layers.0.q_rope"] = dumped["chat/layers.0.q_rope"].reshape(23, -1)[None]
    report = diff(g, dumped)
    assert report.first is None, str(report)


def test_diff_errors_are_clear(tmp_path):
    _, g = pack("tiny-mqa")
    with pytest.raises(ValueError, match="no activations of the golden's prompts in the other"):
        diff(g, {"other/embed": np.zeros((3, 48))})
    with pytest.raises(ValueError, match="no activations recorded for prompt 'bos'"):
        diff(g, {"chat/embed": np.zeros((3, 48))}, prompt="bos")


def test_cli_diff_names_the_divergence(tmp_path, monkeypatch):
    weights, g = pack("tiny-mha")
    good, bad = str(tmp_path / "good.npz"), str(tmp_path / "bad.npz")
    np.savez(good, **dump_hf_activations.dump(load_peer(weights), chat_ids(g)))
    model = load_peer(weights)
    interleaved_rope(model, monkeypatch)
    np.savez(bad, **dump_hf_activations.dump(model, chat_ids(g)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    run = lambda other: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "minigemma", "golden", "diff", g.path, other],
        capture_output=True, text=True, env=env)
    ok = run(good)
    assert ok.returncode == 0, ok.stderr
    assert "no divergence: every point within max rel err 1e-05" in ok.stdout
    found = run(bad)
    assert found.returncode == 1
    assert ("chat: first divergence at layer 0 / post-rope q (layers.0.q_rope): max rel err"
            in found.stdout)
    assert "<-- first divergence" in found.stdout


def test_dump_script_writes_what_diff_reads(tmp_path):
    weights, g = pack("tiny-mqa")
    out = str(tmp_path / "hf.npz")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    res = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "dump_hf_activations.py"),
                          g.path, "--weights", weights, "--out", out],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert diff(g, out).first is None
