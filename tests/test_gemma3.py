"""Gemma 2 and Gemma 3 (text), minigemma/gemma3.py, against transformers' Gemma2ForCausalLM and
Gemma3ForCausalLM on checkpoints they wrote themselves.

Every checkpoint is written by transformers' save_pretrained from seeded random weights, every
tensor randomized (norms and QK-norms included: transformers initialises them to zero, which
would hide a missing 1 + w). The peer runs in float32 with eager attention on CPU.

Tolerance: max |dlogit| / max |logit| <= 1e-5, for logits against transformers, for cached decode
against the full forward, and for each recorded activation against transformers' modules.
The Gemma 2 checkpoint's weights are scaled so that its soft-caps bite: transformers' own
pre-cap attention scores exceed 50 and its pre-cap logits exceed 30 (asserted below).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3Config,  # noqa: E402
                          Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig)
from transformers.models.gemma2 import modeling_gemma2  # noqa: E402

import minigemma  # noqa: E402
import hf_peer  # noqa: E402
from helpers import greedy_continuation, prompt, rel_diff  # noqa: E402
from hf_peer import peer_greedy, peer_logits, randomize  # noqa: E402
from minigemma import gemma3  # noqa: E402
from minigemma.config import GLOBAL, LOCAL, Gemma3Config as OurConfig  # noqa: E402
from minigemma.config import from_hf_config, from_hf_config_v2  # noqa: E402
from minigemma.formats import safetensors  # noqa: E402

TOL = 1e-5
WINDOW = 8
PROMPT = 40  # longer than every window below

# name: (transformers class, config class, config kwargs, embedding std, q/k projection gain)
TINY = {
    # Gemma 2: local, global, local, global; query scale 24^-0.5 (not head_dim^-0.5); soft-caps
    # 50 / 30 (transformers' defaults), made to bite by a large embedding and q/k projections.
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=WINDOW,
        query_pre_attn_scalar=24), 1.5, 4.0),
    # Gemma 3: transformers' default pattern (5 local, 1 global, ...), RoPE 10k local / 1M global.
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=WINDOW),
        0.1, 1.0),
    # Gemma 3 with explicit layer_types (global first), multi-query, linear RoPE scaling x8 on
    # global layers as in 4B+, D = 48 (sqrt(48) differs in bfloat16), window 5.
    "gemma3-scaled": (Gemma3ForCausalLM, Gemma3TextConfig, dict(
        vocab_size=512, hidden_size=48, intermediate_size=80, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=5,
        query_pre_attn_scalar=20, layer_types=[GLOBAL, LOCAL, LOCAL, GLOBAL, LOCAL],
        rope_parameters={LOCAL: dict(rope_type="default", rope_theta=10000.0),
                         GLOBAL: dict(rope_type="linear", factor=8.0, rope_theta=1e6)}),
        0.1, 1.0),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(name, storage): directory} written by save_pretrained as float32 and bfloat16."""
    out = {}
    for seed, (name, (cls, config_cls, kwargs, embed_std, qk_gain)) in enumerate(TINY.items()):
        model = randomize(cls(config_cls(**kwargs)).eval(), seed, embed_std, qk_gain)
        for storage, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            directory = tmp_path_factory.mktemp(f"{name}-{storage}")
            model.to(dtype).save_pretrained(directory)
            out[name, storage] = str(directory)
        model.to(torch.float32)
    return out


def load_peer(name, directory):
    return hf_peer.load_peer(directory, TINY[name][0])


# ----------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("storage", ["f32", "bf16"])
@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("length", [1, 7, PROMPT])
def test_logits_match_transformers(checkpoints, name, storage, length):
    path = checkpoints[name, storage]
    ids = prompt(length)
    ref = peer_logits(load_peer(name, path), ids)
    ours = minigemma.load(path).forward(ids)
    assert ours.shape == ref.shape
    assert rel_diff(ours, ref) <= TOL, f"{name}/{storage}/T={length}: rel {rel_diff(ours, ref):.3g}"


def test_soft_caps_bite_in_transformers(checkpoints, monkeypatch):
    """transformers' own pre-cap values on the gemma2 checkpoint exceed both caps, so the parity
    above covers the soft-caps in their non-linear range."""
    peer = load_peer("gemma2", checkpoints["gemma2", "f32"])
    scores, logits = [], []
    original = modeling_gemma2.eager_attention_forward

    def spy(module, query, key, value, attention_mask, scaling=None, **kwargs):
        key_states = modeling_gemma2.repeat_kv(key, module.num_key_value_groups)
        raw = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        scores.append(float(raw.abs().masked_fill(~allowed, 0).max()))
        return original(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    monkeypatch.setattr(modeling_gemma2, "eager_attention_forward", spy)
    peer.lm_head.register_forward_hook(lambda m, args, out: logits.append(out))
    capped = peer_logits(peer, prompt(PROMPT))
    assert peer.config.attn_logit_softcapping == 50.0 and max(scores) > 50.0
    assert peer.config.final_logit_softcapping == 30.0 and float(logits[0].abs().max()) > 30.0
    assert np.abs(capped).max() < 30.0


@pytest.mark.parametrize("name", list(TINY))
def test_cached_decode_past_the_window_equals_full_forward(checkpoints, name):
    model = minigemma.load(checkpoints[name, "bf16"])
    c = model.config
    ids = prompt(PROMPT, seed=1)
    full = model.forward(ids)
    cache = model.new_cache(64)
    # a prefill longer than the window, a short piece, then one token at a time
    pieces = [model.forward(ids[:20], cache), model.forward(ids[20:23], cache)]
    pieces += [model.forward(ids[i:i + 1], cache) for i in range(23, PROMPT)]
    assert cache.length == PROMPT
    assert [len(k) for k in cache.k] == [c.sliding_window if t == LOCAL else 64
                                         for t in c.layer_types]
    assert rel_diff(np.concatenate(pieces), full) <= TOL


@pytest.mark.parametrize("name", list(TINY))
def test_greedy_continuation_equals_transformers_generate(checkpoints, name):
    path = checkpoints[name, "bf16"]
    ids = prompt(9, seed=2)
    ours = greedy_continuation(minigemma.load(path), ids, 64)
    assert ours == peer_greedy(load_peer(name, path), ids, 64)


def test_float64_agrees_with_float32(checkpoints):
    path = checkpoints["gemma3", "bf16"]
    ids = prompt(PROMPT, seed=3)
    f64 = minigemma.load(path, dtype=np.float64).forward(ids)
    assert f64.dtype == np.float64
    assert rel_diff(minigemma.load(path).forward(ids), f64) <= TOL


def test_bf16_normalizer_matches_transformers_with_rounded_scale(checkpoints):
    """D = 48: sqrt(48) = 6.9282 in float32, 6.9375 in bfloat16 (the official Embedder with
    bfloat16 parameters). transformers with that embed_scale agrees with normalizer="bf16"."""
    path = checkpoints["gemma3-scaled", "f32"]
    ids = prompt(PROMPT)
    peer = load_peer("gemma3-scaled", path)
    peer.model.embed_tokens.embed_scale.fill_(torch.tensor(48 ** 0.5).to(torch.bfloat16).item())
    ref = peer_logits(peer, ids)
    rounded = minigemma.load(path, normalizer="bf16")
    assert rounded.normalizer == np.float32(6.9375)
    assert rel_diff(rounded.forward(ids), ref) <= TOL
    assert rel_diff(minigemma.load(path).forward(ids), ref) > TOL


def test_multimodal_gemma3_checkpoint_runs_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (model_type "gemma3"): the text tensors are
    read under their hub names, the vision tower is dropped, text logits match transformers."""
    config = Gemma3Config(
        text_config=dict(TINY["gemma3"][2], num_hidden_layers=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=509, eoi_token_index=510, image_token_index=511)
    randomize(Gemma3ForConditionalGeneration(config).eval(), 7, 0.1, 1.0).save_pretrained(tmp_path)
    peer = Gemma3ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    ids = prompt(20) % 500
    ids[0] = 2
    ours = minigemma.load(tmp_path)
    assert ours.config.n_layers == 3 and ours.config.qk_norm
    assert rel_diff(ours.forward(ids), peer_logits(peer, ids)) <= TOL


# ----------------------------------------------------------------------------------------------
# Activations recorded under the names of the divergence finder, against transformers' modules


def peer_activations(peer, ids):
    """{point name: array} from forward hooks on transformers' modules (q_rope/k_rope have no
    module to hook)."""
    acts, hooks = {}, []

    def save(name, transform=lambda t: t, use_input=False):
        def hook(module, args, out):
            acts[name] = transform((args[0] if use_input else out)[0]).detach().numpy()
        return hook

    m = peer.model
    heads = lambda t: t.transpose(0, 1)  # [heads, T, H] -> [T, heads, H]
    hooks.append(m.embed_tokens.register_forward_hook(save("embed")))
    for i, layer in enumerate(m.layers):
        p = f"layers.{i}."
        attn = layer.self_attn
        hooks += [
            layer.input_layernorm.register_forward_hook(save(p + "attn_norm")),
            attn.o_proj.register_forward_hook(save(p + "attn_out", use_input=True)),
            layer.post_attention_layernorm.register_forward_hook(save(p + "post_attn_norm")),
            layer.pre_feedforward_layernorm.register_forward_hook(
                save(p + "resid_attn", use_input=True)),
            layer.pre_feedforward_layernorm.register_forward_hook(save(p + "ffn_norm")),
            layer.mlp.register_forward_hook(save(p + "ffn_out")),
            layer.post_feedforward_layernorm.register_forward_hook(save(p + "post_ffn_norm")),
            layer.register_forward_hook(save(p + "resid_block")),
        ]
        if hasattr(attn, "q_norm"):
            hooks += [attn.q_norm.register_forward_hook(save(p + "q_norm", heads)),
                      attn.k_norm.register_forward_hook(save(p + "k_norm", heads))]
    hooks.append(m.norm.register_forward_hook(save("final_norm")))
    acts["logits"] = peer_logits(peer, ids)
    for h in hooks:
        h.remove()
    return acts


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_recorded_activations_match_transformers_modules(checkpoints, name):
    path = checkpoints[name, "f32"]
    ids = prompt(PROMPT, seed=4)
    model = minigemma.load(path)
    record = {}
    model.forward(ids, record=record)
    assert list(record) == gemma3.activation_points(model.config)
    theirs = peer_activations(load_peer(name, path), ids)
    assert set(theirs) == {p for p in record if not p.endswith(("q_rope", "k_rope"))}
    for point, ref in theirs.items():
        assert record[point].shape == ref.shape, point
        diff = rel_diff(record[point], ref)
        assert diff <= TOL, f"{point}: rel {diff:.3g}"


# ----------------------------------------------------------------------------------------------
# Planted bugs: each one breaks parity with transformers


def without_qk_norm(monkeypatch):
    monkeypatch.setattr(gemma3, "qk_norm", lambda x, w, eps: x)


def one_rope_base(monkeypatch):
    monkeypatch.setattr(gemma3, "rope_for_layer",
                        lambda config, layer_type: (config.local_rope_base, 1.0))


def no_window(monkeypatch):
    original = gemma3.visible
    monkeypatch.setattr(gemma3, "visible", lambda q, k, window: original(q, k, None))


def no_soft_caps(monkeypatch):
    monkeypatch.setattr(gemma3, "soft_cap", lambda x, cap: x)


def no_attention_soft_cap(monkeypatch):
    original = gemma3.soft_cap
    monkeypatch.setattr(gemma3, "soft_cap", lambda x, cap: x if cap == 50.0 else original(x, cap))


def no_final_soft_cap(monkeypatch):
    original = gemma3.soft_cap
    monkeypatch.setattr(gemma3, "soft_cap", lambda x, cap: x if cap == 30.0 else original(x, cap))


PLANTED = [(without_qk_norm, "gemma3"), (without_qk_norm, "gemma3-scaled"),
           (one_rope_base, "gemma3"), (one_rope_base, "gemma3-scaled"),
           (no_window, "gemma2"), (no_window, "gemma3"), (no_window, "gemma3-scaled"),
           (no_soft_caps, "gemma2"), (no_attention_soft_cap, "gemma2"),
           (no_final_soft_cap, "gemma2")]


@pytest.mark.parametrize("bug, name", PLANTED, ids=[f"{b.__name__}-{n}" for b, n in PLANTED])
def test_planted_bug_breaks_parity(checkpoints, monkeypatch, bug, name):
    path = checkpoints[name, "f32"]
    ids = prompt(PROMPT)
    ref = peer_logits(load_peer(name, path), ids)
    bug(monkeypatch)
    diff = rel_diff(minigemma.load(path).forward(ids), ref)
    assert diff > TOL, f"{bug.__name__} on {name} went unnoticed (rel {diff:.3g})"


# ----------------------------------------------------------------------------------------------
# Config and weights


def test_config_json_written_by_transformers(checkpoints):
    for name in TINY:
        with open(os.path.join(checkpoints[name, "f32"], "config.json")) as f:
            hf_json = json.load(f)
        ours = from_hf_config_v2(hf_json)
        hf = TINY[name][1](**TINY[name][2])
        rope = hf.rope_parameters
        local, full = (rope, rope) if name == "gemma2" else (rope[LOCAL], rope[GLOBAL])
        assert (ours.vocab_size, ours.d_model, ours.n_layers, ours.n_heads, ours.n_kv_heads,
                ours.head_dim, ours.ffn_dim, ours.max_positions, ours.layer_types,
                ours.sliding_window, ours.query_pre_attn_scalar, ours.attn_softcap,
                ours.final_softcap, ours.local_rope_base, ours.global_rope_base,
                ours.global_rope_factor, ours.norm_eps, ours.qk_norm) == (
            hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads,
            hf.num_key_value_heads, hf.head_dim, hf.intermediate_size,
            hf.max_position_embeddings, tuple(hf.layer_types), hf.sliding_window,
            hf.query_pre_attn_scalar, hf.attn_logit_softcapping, hf.final_logit_softcapping,
            local["rope_theta"], full["rope_theta"], full.get("factor", 1.0), hf.rms_norm_eps,
            name != "gemma2")


def test_transformers_defaults_fill_missing_keys():
    """A config.json may omit keys (the Gemma 3 4B one lists a few under text_config):
    reading it bare gives what transformers reads, its class defaults."""
    for model_type, hf_class in (("gemma2", Gemma2Config), ("gemma3_text", Gemma3TextConfig)):
        assert from_hf_config_v2({"model_type": model_type}) == \
            from_hf_config_v2(hf_class().to_dict())
    sparse = dict(model_type="gemma3", text_config=dict(
        model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
        rope_scaling=dict(factor=8.0, rope_type="linear"), sliding_window=1024))
    expanded = Gemma3Config(text_config=dict(sparse["text_config"])).to_dict()
    ours = from_hf_config_v2(sparse)
    assert ours == from_hf_config_v2(expanded)
    assert (ours.vocab_size, ours.n_real_tokens, ours.global_rope_factor, ours.global_rope_base,
            ours.local_rope_factor, ours.layer_types.count(GLOBAL)) == (262208, 262144, 8.0, 1e6,
                                                                          1.0, 5)


def test_older_config_keys_read_as_transformers_reads_them():
    """rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern (configs written
    before transformers 5) against the rope_parameters transformers 5.24 converts them to."""
    old = dict(model_type="gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=128,
               num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
               rope_theta=123456.0, rope_local_base_freq=2000.0, sliding_window_pattern=3,
               rope_scaling=dict(rope_type="linear", factor=4.0))
    new = Gemma3TextConfig(**{k: v for k, v in old.items() if k != "model_type"}).to_dict()
    assert "rope_theta" not in new and "rope_parameters" in new
    ours = from_hf_config_v2(old)
    assert ours == from_hf_config_v2(new)
    assert (ours.global_rope_base, ours.local_rope_base, ours.global_rope_factor) == (
        123456.0, 2000.0, 4.0)
    assert ours.layer_types == (LOCAL, LOCAL, GLOBAL) * 2 + (LOCAL, LOCAL)


def test_full_vocab_gemma3_config_is_accepted_and_shaped_like_transformers():
    """The Gemma 3 270M shape with its 262,144-piece vocabulary: config and expected tensor
    shapes against transformers' module shapes (meta device: no memory)."""
    hf = dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
              num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
              max_position_embeddings=32768, sliding_window=512, rope_theta=1e6,
              rope_local_base_freq=10000.0, query_pre_attn_scalar=256, rope_scaling=None,
              final_logit_softcapping=None, attn_logit_softcapping=None)
    ours = from_hf_config_v2(hf)
    assert (ours.vocab_size, ours.n_real_tokens, ours.sliding_window) == (262144, 262144, 512)
    assert ours.layer_types == (LOCAL,) * 5 + (GLOBAL,) + (LOCAL,) * 5 + (GLOBAL,) + (LOCAL,) * 5 \
        + (GLOBAL,)
    for peer_class, config in ((Gemma3ForCausalLM, Gemma3TextConfig(**hf)),
                               (Gemma2ForCausalLM, Gemma2Config())):
        with torch.device("meta"):
            peer = peer_class(config)
        theirs = {n: tuple(p.shape) for n, p in peer.state_dict().items() if n != "lm_head.weight"}
        assert gemma3.expected_shapes_v2(from_hf_config_v2(config.to_dict())) == theirs


def test_gemma1_reader_is_unchanged_for_gemma2():
    with pytest.raises(ValueError, match="model_type is 'gemma2'; minigemma implements Gemma 1"):
        from_hf_config({"model_type": "gemma2"})
    with pytest.raises(ValueError, match="read by from_hf_config"):
        from_hf_config_v2({"model_type": "gemma"})


@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters={GLOBAL: dict(rope_type="yarn", factor=2.0)}), "RoPE type 'yarn'"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1.0)), "keyed by layer type"),
    (dict(rope_scaling=dict(type="linear", factor=8.0)), "transformers ignores the factor"),
    (dict(attn_logit_softcapping=50.0), "no attention soft-cap"),
    (dict(layer_types=[LOCAL] * 3), "layer_types has 3 entries for 7 layers"),
    (dict(layer_types=["chunked_attention"] * 7), "layer type 'chunked_attention'"),
    (dict(hidden_activation="gelu_exact"), "activation 'gelu_exact'"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention is true"),
    (dict(sliding_window=0), "sliding_window must be a positive integer"),
])
def test_bad_config_is_named(change, message):
    hf = dict(model_type="gemma3_text", num_hidden_layers=7, **change)
    with pytest.raises(ValueError, match=message) as e:
        from_hf_config_v2(hf, source="dir/config.json")
    assert str(e.value).startswith("dir/config.json")


def copy_with(src, dst, edit):
    """A copy of checkpoint `src` whose tensors went through edit(dict)."""
    shutil.copytree(src, dst)
    stored = safetensors.read(os.path.join(src, "model.safetensors"))
    tensors = {name: np.array(t) for name, t in stored.items()}
    edit(tensors)
    safetensors.write(os.path.join(dst, "model.safetensors"), tensors)
    return str(dst)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.2.self_attn.q_norm.weight"),
     r"tensor model.layers.2.self_attn.q_norm.weight is missing \(expected shape \(32,\)\)"),
    (lambda t: t.update({"model.layers.0.post_feedforward_layernorm.weight":
                         np.zeros(63, np.float32)}),
     r"post_feedforward_layernorm.weight has shape \(63,\), expected \(64,\)"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(128, np.float32)}),
     "unexpected tensor model.layers.0.self_attn.q_proj.bias"),
    (lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}),
     "lm_head.weight differs from model.embed_tokens.weight; Gemma 3 ties them"),
])
def test_bad_weights_are_named(checkpoints, tmp_path, edit, message):
    path = copy_with(checkpoints["gemma3", "f32"], tmp_path / "edited", edit)
    with pytest.raises(ValueError, match=message):
        minigemma.load(path)


def test_bad_input_is_named(checkpoints, tmp_path):
    model = minigemma.load(checkpoints["gemma3", "f32"])
    with pytest.raises(ValueError, match="id 512 is out of range"):
        model.forward([2, 512])
    with pytest.raises(ValueError, match="exceed the cache's max_len"):
        model.forward(prompt(10), model.new_cache(9))
    other = minigemma.load(checkpoints["gemma2", "f32"])
    with pytest.raises(ValueError, match="cache was made for a different model"):
        model.forward([2], other.new_cache(9))
    with pytest.raises(ValueError, match="cache must come from model.new_cache"):
        model.forward([2], {})
    with pytest.raises(ValueError, match="no checkpoint found"):
        minigemma.load(tmp_path)


def test_config_rejects_inconsistent_hyperparameters():
    base = dict(vocab_size=8, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4,
                ffn_dim=8, max_positions=16, layer_types=[LOCAL, GLOBAL], sliding_window=4,
                query_pre_attn_scalar=4, qk_norm=True, attn_softcap=None, final_softcap=None)
    assert OurConfig(**base).layer_types == (LOCAL, GLOBAL)
    with pytest.raises(ValueError, match="global_rope_factor .* must be a number >= 1"):
        OurConfig(**base, global_rope_factor=0.5)
    with pytest.raises(ValueError, match="attn_softcap must be a positive number"):
        OurConfig(**dict(base, attn_softcap=0))
