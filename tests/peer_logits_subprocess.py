"""transformers' logits for one prompt, computed in a process of its own and saved to an .npy file.

    python tests/peer_logits_subprocess.py CHECKPOINT_DIR OUT.npy ID [ID ...]

At the true 2B shape transformers' float32 model holds ~10 GB. Running it here, in a process that
exits when done, means that memory is freed before minigemma runs: the two models are never in
memory at once. `from_pretrained` would also keep the 5 GB of mapped bfloat16 files resident while
it converts them (a 14 GB peak), so the model is built by transformers from config.json and its
weights are copied in one tensor at a time with the safetensors package (an ~10 GB peak). The last line of stdout is JSON with the load and forward times (seconds) and this
process's peak resident memory and, at exit, its anonymous and file-backed parts (bytes).
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from safetensors import safe_open
from transformers import GemmaConfig, GemmaForCausalLM

from hf_peer import peer_logits


def proc_status(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM = peak VmRSS, RssAnon, RssFile) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} line in /proc/self/status")


def load_peer_tensor_by_tensor(directory):
    """transformers' GemmaForCausalLM (float32, eager) with the checkpoint's weights copied in one
    tensor at a time, each shard mapped only while that tensor is read."""
    config = GemmaConfig.from_pretrained(directory)
    config._attn_implementation = "eager"
    model = GemmaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, so copied once
    params = dict(model.named_parameters())
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(weight_map) == sorted(params), "checkpoint and transformers' tensors differ"
    with torch.no_grad():
        for name, shard in weight_map.items():
            with safe_open(os.path.join(directory, shard), "pt") as f:
                params[name].copy_(f.get_tensor(name))
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="where to np.save the [T, V] float32 logits")
    parser.add_argument("ids", nargs="+", type=int, help="token ids of the prompt")
    args = parser.parse_args()

    started = time.perf_counter()
    model = load_peer_tensor_by_tensor(args.checkpoint)
    loaded = time.perf_counter()
    logits = peer_logits(model, np.array(args.ids))
    done = time.perf_counter()
    np.save(args.out, logits)
    memory = {field: proc_status(field) for field in ("VmHWM", "RssAnon", "RssFile")}
    print(json.dumps({"load_s": loaded - started, "forward_s": done - loaded, **memory}))


if __name__ == "__main__":
    main()
