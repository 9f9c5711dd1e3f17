"""The independent peer: transformers' GemmaForCausalLM on CPU, and checkpoints it writes itself.

Every checkpoint used by the parity tests is written by transformers' own `save_pretrained` from
seeded random weights. transformers initialises RMSNorm weights to zero, which would hide a missing
or doubled (1 + w): every tensor, norms included, is overwritten with seeded random values.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import GemmaConfig, GemmaForCausalLM  # noqa: E402

# Tiny configurations covering every attention layout of Gemma 1.
TINY = {
    # multi-query like 2B: 4 query heads share 1 kv head
    "mqa": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    # multi-head like 7B, with N*H (4*24 = 96) != D (64): head_dim is not D/N
    "mha": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, head_dim=24),
    # grouped: 4 query heads, 2 kv heads
    "gqa": dict(vocab_size=512, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def random_gemma(config_kwargs, seed=0, embed_std=0.1):
    """A transformers GemmaForCausalLM whose every tensor is seeded random (randomize)."""
    return randomize(GemmaForCausalLM(GemmaConfig(**config_kwargs)).eval(), seed, embed_std)


def randomize(model, seed, embed_std=0.1, qk_gain=1):
    """Overwrite every tensor of a transformers Gemma (1, 2 or 3) with seeded random values.

    Linear weights ~ N(0, 1/fan_in) so activations stay O(1) (GELU inputs where the tanh and erf
    GELUs differ), q_proj and k_proj times qk_gain (Gemma 2's soft-caps bite with a large gain);
    norm weights ~ N(0, 0.5) so (1 + w) and w differ; the embedding ~ N(0, embed_std) keeps
    logits O(1-10).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                std = embed_std
            elif p.ndim == 2:
                std = p.shape[1] ** -0.5 * (qk_gain if name.endswith(("q_proj.weight",
                                                                     "k_proj.weight")) else 1)
            else:
                std = 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def save_checkpoint(model, directory, dtype=torch.float32):
    """save_pretrained in the given storage dtype (float32 or bfloat16) -> directory."""
    model.to(dtype).save_pretrained(directory)
    model.to(torch.float32)
    return directory


def load_peer(directory, model_class=GemmaForCausalLM):
    """transformers' own model (model_class: Gemma 1 unless told) read back from `directory`,
    float32, eager attention, on CPU."""
    return model_class.from_pretrained(directory, dtype=torch.float32,
                                       attn_implementation="eager").eval()


def peer_logits(model, token_ids):
    """[T, V] float32 logits of transformers for one unpadded sequence."""
    with torch.no_grad():
        return model(torch.tensor(np.asarray(token_ids))[None]).logits[0].float().numpy()


def peer_greedy(model, token_ids, n_new):
    """transformers' generate(do_sample=False): the n_new greedy token ids after token_ids."""
    ids = torch.tensor(np.asarray(token_ids))[None]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0)
    return out[0, len(token_ids):].tolist()
