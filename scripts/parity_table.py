"""Print minigemma vs transformers agreement on the tiny test configurations (the numbers behind
tests/test_parity.py). Needs the test dependencies: .venv/bin/python scripts/parity_table.py"""

import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
import minigemma  # noqa: E402
from hf_peer import TINY, load_peer, peer_logits, random_gemma, save_checkpoint  # noqa: E402
from test_parity import prompt  # noqa: E402


def main():
    print(f"{'config':6} {'stored':6} {'T':>4} {'max|dlogit|':>12} {'max|logit|':>10} {'rel':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (name, kwargs) in enumerate(TINY.items()):
            model = random_gemma(kwargs, seed=seed)
            for storage, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
                path = save_checkpoint(model, os.path.join(tmp, f"{name}-{storage}"), dtype)
                peer, ours = load_peer(path), minigemma.load(path)
                for length in (1, 7, 300):
                    ids = prompt(length)
                    ref = peer_logits(peer, ids)
                    diff = float(np.abs(ours.forward(ids).astype(np.float64) - ref).max())
                    scale = float(np.abs(ref).max())
                    print(f"{name:6} {storage:6} {length:4d} {diff:12.3g} {scale:10.3g} {diff / scale:9.2g}")


if __name__ == "__main__":
    main()
