import pytest
import torch

from hf_peer import TINY, random_gemma, save_checkpoint

STORAGE = {"f32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{(config name, storage): directory} for every TINY config, stored as float32 and as
    bfloat16 by transformers' own save_pretrained."""
    out = {}
    for seed, (name, kwargs) in enumerate(TINY.items()):
        model = random_gemma(kwargs, seed=seed)
        for storage, dtype in STORAGE.items():
            directory = tmp_path_factory.mktemp(f"{name}-{storage}")
            out[name, storage] = str(save_checkpoint(model, directory, dtype))
    return out
