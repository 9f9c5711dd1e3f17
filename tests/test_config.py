"""Config presets, config.json reading, the 256128-row embedding and the tied output head.

Independent sources: the spec's table of hyperparameters and parameter counts (sourced from the
official Flax / PyTorch code and the Gemma report), transformers' GemmaConfig (its defaults are the
7B model) and the tensor shapes of transformers' GemmaForCausalLM built on the meta device.
"""

import numpy as np
import pytest
import torch
from transformers import GemmaConfig as HFGemmaConfig
from transformers import GemmaForCausalLM

import minigemma
from minigemma import gemma_2b, gemma_7b
from minigemma.checkpoint import expected_shapes
from minigemma.config import from_hf_config
from hf_peer import TINY, load_peer, peer_logits, random_gemma
from helpers import max_diff
from test_parity import ATOL

# config.json of google/gemma-2b (spec section 3.2); the 7B one is transformers' GemmaConfig().
HF_2B = dict(model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384,
             num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
             hidden_act="gelu", max_position_embeddings=8192, rms_norm_eps=1e-6,
             rope_theta=10000.0, rope_scaling=None)


def test_presets_match_the_spec_table():
    fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
              "max_positions", "rope_base", "norm_eps", "normalizer")
    as_tuple = lambda c: tuple(getattr(c, f) for f in fields)
    assert as_tuple(gemma_2b()) == (256000, 2048, 18, 8, 1, 256, 16384, 8192, 10000.0, 1e-6, "exact")
    assert as_tuple(gemma_7b()) == (256000, 3072, 28, 16, 16, 256, 24576, 8192, 10000.0, 1e-6, "exact")


@pytest.mark.parametrize("preset, n_tensors, n_params", [(gemma_2b, 164, 2_506_172_416),
                                                         (gemma_7b, 254, 8_537_680_896)])
def test_expected_shapes_give_the_spec_tensor_and_parameter_counts(preset, n_tensors, n_params):
    shapes = expected_shapes(preset())
    assert len(shapes) == n_tensors
    assert sum(int(np.prod(s)) for s in shapes.values()) == n_params
    # The Flax files' 256128-row embedding adds 128 padding rows.
    padded = expected_shapes(preset(vocab_size=256128))
    assert sum(int(np.prod(s)) for s in padded.values()) == n_params + 128 * preset().d_model


def test_7b_preset_equals_transformers_defaults():
    assert from_hf_config(HFGemmaConfig().to_dict()) == gemma_7b()


def test_2b_config_json_gives_the_2b_preset():
    assert from_hf_config(HF_2B) == gemma_2b()


@pytest.mark.parametrize("hf_config", [HF_2B, HFGemmaConfig().to_dict()], ids=["2b", "7b"])
def test_expected_shapes_equal_transformers_module_shapes(hf_config):
    with torch.device("meta"):  # shapes only, no memory
        peer = GemmaForCausalLM(HFGemmaConfig(**hf_config))
    theirs = {n: tuple(p.shape) for n, p in peer.state_dict().items() if n != "lm_head.weight"}
    assert expected_shapes(from_hf_config(hf_config)) == theirs


@pytest.mark.parametrize("name", list(TINY))
def test_config_json_written_by_transformers(name):
    hf = HFGemmaConfig(**TINY[name])
    ours = from_hf_config(hf.to_dict())
    assert (ours.vocab_size, ours.d_model, ours.n_layers, ours.n_heads, ours.n_kv_heads,
            ours.head_dim, ours.ffn_dim, ours.max_positions, ours.rope_base, ours.norm_eps) == (
        hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads,
        hf.num_key_value_heads, hf.head_dim, hf.intermediate_size, hf.max_position_embeddings,
        hf.rope_parameters["rope_theta"], hf.rms_norm_eps)


def test_head_dim_is_read_and_defaults_like_transformers():
    with_head_dim = dict(HF_2B, hidden_size=64, num_attention_heads=4, head_dim=24)
    assert from_hf_config(with_head_dim).head_dim == 24
    without = {k: v for k, v in HF_2B.items() if k != "head_dim"} | dict(hidden_size=3072,
                                                                           num_attention_heads=16)
    # transformers reads a missing head_dim as 256, not hidden_size / heads (= 192 here).
    assert from_hf_config(without).head_dim == HFGemmaConfig(**without).head_dim == 256


def test_rope_theta_in_either_place():
    assert from_hf_config(dict(HF_2B, rope_theta=500.0)).rope_base == 500.0
    new_style = {k: v for k, v in HF_2B.items() if k != "rope_theta"}
    new_style["rope_parameters"] = HFGemmaConfig(rope_theta=500.0).rope_parameters
    assert from_hf_config(new_style).rope_base == 500.0


@pytest.mark.parametrize("keys", [
    dict(hidden_act="gelu"),                                         # Gemma 1.0 configs
    dict(hidden_act="gelu_pytorch_tanh"),                            # transformers' spelling
    dict(hidden_act="gelu", hidden_activation="gelu_pytorch_tanh"),  # Gemma 1.1 configs
    dict(hidden_activation="gelu_pytorch_tanh"),
])
def test_tanh_gelu_accepted_under_either_key(keys):
    hf = {k: v for k, v in HF_2B.items() if k != "hidden_act"} | keys
    assert from_hf_config(hf) == gemma_2b()


@pytest.mark.parametrize("keys, named", [
    (dict(hidden_act="relu"), "'relu'"),
    (dict(hidden_act="silu"), "'silu'"),
    (dict(hidden_act="gelu", hidden_activation="silu"), "'silu'"),
    (dict(hidden_activation="geglu_exact"), "'geglu_exact'"),
])
def test_other_activations_refused(keys, named):
    hf = {k: v for k, v in HF_2B.items() if k != "hidden_act"} | keys
    with pytest.raises(ValueError) as e:
        from_hf_config(hf, source="x/config.json")
    message = str(e.value)
    assert message.startswith("x/config.json: activation " + named)
    assert "tanh-approximate GELU" in message and "gelu_pytorch_tanh" in message


@pytest.mark.parametrize("model_type", ["gemma2", "llama", "recurrent_gemma"])
def test_other_model_types_refused(model_type):
    with pytest.raises(ValueError, match=f"x/config.json: model_type is '{model_type}'; "
                                         f"minigemma implements Gemma 1"):
        from_hf_config(dict(HF_2B, model_type=model_type), source="x/config.json")


def test_rope_scaling_refused():
    with pytest.raises(ValueError, match="x/config.json: rope scaling .*linear.* not used by Gemma 1"):
        from_hf_config(dict(HF_2B, rope_scaling={"rope_type": "linear", "factor": 2.0}),
                       source="x/config.json")
    new_style = dict(HF_2B, rope_parameters={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="not used by Gemma 1"):
        from_hf_config(new_style)


# ----------------------------------------------------------------------------------------------
# The 256128-row embedding of Flax-derived files: 128 padding rows, never scored or sampled.

PADDED = dict(vocab_size=256128, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, head_dim=4)


@pytest.fixture(scope="module")
def padded_checkpoint(tmp_path_factory):
    model = random_gemma(PADDED, seed=7)
    with torch.no_grad():  # padding rows so large that, were they scored, they would win argmax
        model.model.embed_tokens.weight[256000:] *= 1000
    directory = tmp_path_factory.mktemp("padded")
    model.save_pretrained(directory)
    return str(directory)


def test_padded_embedding_scores_real_tokens_only(padded_checkpoint):
    ids = np.array([2, 17, 255999, 40000, 123456, 9])
    model = minigemma.load(padded_checkpoint)
    assert model.config.vocab_size == 256128 and model.config.n_real_tokens == 256000
    assert model.weights["model.embed_tokens.weight"].shape == (256128, 8)
    ours = model.forward(ids)
    ref = peer_logits(load_peer(padded_checkpoint), ids)  # [T, 256128]
    assert ours.shape == (len(ids), 256000)
    assert max_diff(ours, ref[:, :256000]) <= ATOL
    # The padding rows would have won in transformers, which scores them; ours never can.
    assert (ref.argmax(axis=1) >= 256000).all()
    assert (ours.argmax(axis=1) == ref[:, :256000].argmax(axis=1)).all()


def test_padding_ids_are_not_tokens(padded_checkpoint):
    model = minigemma.load(padded_checkpoint)
    with pytest.raises(ValueError, match=r"token_ids: id 256000 is out of range; the vocabulary "
                                         r"has ids 0..255999"):
        model.forward([2, 256000])


# ----------------------------------------------------------------------------------------------
# Tied output head: a stored lm_head.weight must equal the embedding.

def untied_checkpoint(directory, lm_head_equal, storage):
    model = random_gemma(dict(TINY["mqa"], tie_word_embeddings=False), seed=5)
    if lm_head_equal:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.to(storage).save_pretrained(directory)
    return str(directory)


def test_lm_head_equal_to_embedding_is_accepted(tmp_path):
    path = untied_checkpoint(tmp_path, lm_head_equal=True, storage=torch.bfloat16)
    model = minigemma.load(path)
    assert "lm_head.weight" in model.weights  # save_pretrained did write it
    ids = np.array([2, 5, 300, 7, 511])
    assert max_diff(model.forward(ids), peer_logits(load_peer(path), ids)) <= ATOL


def test_lm_head_different_from_embedding_is_refused(tmp_path):
    path = untied_checkpoint(tmp_path, lm_head_equal=False, storage=torch.float32)
    with pytest.raises(ValueError, match=f"{tmp_path}: lm_head.weight differs from "
                                         f"model.embed_tokens.weight .*Gemma 1 ties them"):
        minigemma.load(path)
