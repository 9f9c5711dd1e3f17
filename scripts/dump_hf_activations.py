"""Dump transformers' GemmaForCausalLM activations under the golden's point names.

    python scripts/dump_hf_activations.py GOLDEN --weights DIR --out hf.npz
    minigemma golden diff GOLDEN hf.npz

Needs torch and transformers (not minigemma's runtime dependencies, so this is a script, not part
of the package). For every prompt of the golden that has activations, runs its token ids through
transformers in float32 (eager attention) and saves "<prompt>/<point>" arrays without the batch
axis, plus "<prompt>/tokens".

Where each point is taken (forward hooks; "pre" = the input of a module):

    embed                  model.embed_tokens output (already multiplied by sqrt(D))
    layers.i.attn_norm     layers[i].input_layernorm output
    layers.i.q_rope/k_rope q_proj / k_proj outputs, rotated after the attention module ran with
                           the cos/sin it received and the apply_rotary_pos_emb its own module
                           uses (RoPE is applied inside GemmaAttention.forward, with no module
                           boundary to hook; a patched apply_rotary_pos_emb shows up here too)
    layers.i.attn_out      pre o_proj
    layers.i.resid_attn    pre post_attention_layernorm (residual + attention)
    layers.i.ffn_norm      post_attention_layernorm output (the pre-FFN norm)
    layers.i.ffn_out       mlp output
    layers.i.resid_block   layers[i] output
    final_norm             model.norm output
    logits                 the model's logits
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def to_numpy(t):
    return t.detach()[0].float().numpy().copy()  # drop the batch axis of 1


def record_activations(model, token_ids):
    """{point: array} of one unbatched forward of a transformers GemmaForCausalLM."""
    acts, hooks = {}, []

    def output_of(module, name):
        hooks.append(module.register_forward_hook(
            lambda m, args, out: acts.__setitem__(name, to_numpy(out))))

    def input_of(module, name):
        hooks.append(module.register_forward_pre_hook(
            lambda m, args: acts.__setitem__(name, to_numpy(args[0]))))

    def rotated_qk(attn, prefix):
        projected = {}
        for key in ("q", "k"):
            proj = getattr(attn, f"{key}_proj")
            hooks.append(proj.register_forward_hook(
                lambda m, args, out, key=key: projected.__setitem__(key, out)))

        def rotate(m, args, kwargs, out):
            cos, sin = kwargs["position_embeddings"]
            apply = sys.modules[type(m).__module__].apply_rotary_pos_emb
            T = projected["q"].shape[1]
            q = projected["q"].view(1, T, -1, m.head_dim).transpose(1, 2)  # [1, N, T, H]
            k = projected["k"].view(1, T, -1, m.head_dim).transpose(1, 2)  # [1, K, T, H]
            q, k = apply(q, k, cos, sin)
            acts[prefix + "q_rope"] = to_numpy(q.transpose(1, 2))         # [T, N, H]
            acts[prefix + "k_rope"] = to_numpy(k.transpose(1, 2))         # [T, K, H]
        hooks.append(attn.register_forward_hook(rotate, with_kwargs=True))

    gemma = model.model
    output_of(gemma.embed_tokens, "embed")
    for i, layer in enumerate(gemma.layers):
        p = f"layers.{i}."
        output_of(layer.input_layernorm, p + "attn_norm")
        rotated_qk(layer.self_attn, p)
        input_of(layer.self_attn.o_proj, p + "attn_out")
        input_of(layer.post_attention_layernorm, p + "resid_attn")
        output_of(layer.post_attention_layernorm, p + "ffn_norm")
        output_of(layer.mlp, p + "ffn_out")
        output_of(layer, p + "resid_block")
    output_of(gemma.norm, "final_norm")
    try:
        with torch.no_grad():
            logits = model(torch.tensor(np.asarray(token_ids))[None]).logits
    finally:
        for h in hooks:
            h.remove()
    acts["logits"] = to_numpy(logits)
    return acts


def dump(model, prompts):
    """{"<prompt>/<point>": array} for {prompt name: token ids}."""
    out = {}
    for name, ids in prompts.items():
        out[f"{name}/tokens"] = np.asarray(ids, np.int32)
        out.update({f"{name}/{point}": a for point, a in record_activations(model, ids).items()})
    return out


def main(argv=None):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    import minigemma.golden
    from transformers import GemmaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("golden", help="golden directory recorded with --activations")
    parser.add_argument("--weights", required=True, help="checkpoint directory transformers loads")
    parser.add_argument("--out", required=True, help=".npz to write")
    args = parser.parse_args(argv)

    golden = minigemma.golden.load(args.golden)
    prompts = {p["name"]: p["token_ids"] for p in golden.prompts if p["activations"]}
    if not prompts:
        parser.error(f"{args.golden}: recorded without --activations; nothing to dump")
    model = GemmaForCausalLM.from_pretrained(args.weights, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    np.savez(args.out, **dump(model, prompts))
    print(f"wrote {args.out}: activations of {', '.join(prompts)}", file=sys.stderr)


if __name__ == "__main__":
    main()
