"""Small helpers the test files share: seeded random prompts, the size of a difference between two
sets of logits, minigemma's greedy continuation, the lock held while a full-size model is in
memory, checks on bad input's error and on stored bits, and GGUF files written by the gguf
package's writer."""

import contextlib
import time

import numpy as np
import pytest

from minigemma.cache import full_size_lock as machine_wide_lock
from minigemma.errors import MinigemmaError


def prompt(length, vocab=512, seed=0):
    """`length` seeded random token ids from [3, vocab), <bos> (2) first. -> int64 [T]"""
    ids = np.random.default_rng(seed).integers(3, vocab, size=length)
    ids[0] = 2  # <bos>
    return ids


def max_diff(ours, ref):
    """max |ours - ref| over every element, in float64."""
    return float(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).max())


def rel_diff(ours, ref):
    """max |ours - ref| relative to max |ref|: logits are O(1-10), so this is ~ the absolute / 10."""
    return max_diff(ours, ref) / float(np.abs(np.asarray(ref, np.float64)).max())


def greedy_continuation(model, ids, n_new):
    """minigemma's n_new greedy token ids after ids: the prompt in one forward, then one token at a
    time through the KV cache."""
    cache = model.new_cache(len(ids) + n_new)
    logits = model.forward(ids, cache, last_only=True)
    out = []
    for _ in range(n_new):
        out.append(int(np.argmax(logits[-1])))
        logits = model.forward([out[-1]], cache)
    return out


def alone_and_together(model, decoder, prompts, continuations):
    """Each prompt prefilled and continued by its tokens (one step each), first each sequence
    alone, then all together (prefill_many, step_many). -> two [J, 1 + steps, V] arrays of
    logits, which a decode engine must make equal bit for bit."""
    alone = []
    for p, more in zip(prompts, continuations):
        cache = model.new_cache(len(p) + len(more))
        alone.append([decoder.prefill(p, cache), *(decoder.step(t, cache) for t in more)])
    caches = [model.new_cache(len(p) + len(more)) for p, more in zip(prompts, continuations)]
    together = [decoder.prefill_many(prompts, caches)]
    for step in range(len(continuations[0])):
        together.append(decoder.step_many([more[step] for more in continuations], caches))
    return np.array(alone), np.stack(together, axis=1)


@contextlib.contextmanager
def full_size_lock():
    """minigemma.cache.full_size_lock() (one full-size model in memory at a time, across
    processes), printing how long the test waited for it (seen with pytest -s)."""
    started = time.perf_counter()
    with machine_wide_lock():
        print(f"\nwaited {time.perf_counter() - started:.0f} s for the full-size lock")
        yield


def raises(call, *fragments, error=MinigemmaError):
    """Run call(), expect `error` (a MinigemmaError by default), check that it is a MinigemmaError
    and that every fragment is in its message, and return the error."""
    with pytest.raises(error) as e:
        call()
    assert isinstance(e.value, MinigemmaError), type(e.value)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in {str(e.value)!r}"
    return e.value


def bits(array):
    """The raw bytes of an array as unsigned integers, so NaNs and -0.0 compare exactly."""
    array = np.asarray(array, order="C")
    return array.view(f"<u{array.dtype.itemsize}")


def mapped_file(array):
    """The file an array is a view of, following .base to the np.memmap; None for a copy."""
    while array is not None:
        if isinstance(array, np.memmap):
            return array.filename
        array = array.base
    return None


def write_gguf(path, tensors, config, architecture="gemma"):
    """A GGUF with the metadata llama.cpp's converter writes for Gemma, from `config` (a Hugging
    Face config dict), and the given tensors, {GGUF name: (array, ggml type)}; quantized arrays
    are uint8 blocks [rows, bytes per row]. -> str path"""
    import gguf  # the optional gguf extra: every caller has importorskip'd it

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    finish_gguf(writer, tensors)
    return str(path)


def finish_gguf(writer, tensors):
    """Add {GGUF name: (array, ggml type)} to a gguf.GGUFWriter that holds the metadata, write the
    file and close it."""
    for name, (array, ggml_type) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
