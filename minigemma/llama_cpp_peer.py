"""llama.cpp as a peer: its logits and greedy tokens on a golden's prompts, written in the golden's
layout, so that minigemma's comparison (golden.compare) and KL report (kl.py) can judge them.

    python -m minigemma.llama_cpp_peer GOLDEN MODEL.gguf OUT.npz [--kv-cache f16|f32] [--threads N]

llama.cpp runs through llama-cpp-python (optional: `pip install llama-cpp-python`), on the token
ids recorded in the golden (no tokenizer plays a part). Each prompt is evaluated in one batch with
the logits of every position kept, then continued greedily one token at a time (argmax, no stop on
<eos>) for as many tokens as the golden holds, as the golden itself was recorded. OUT.npz holds,
per prompt, "<prompt>/tokens" [T] int32, "<prompt>/logits" [T, V] float32 (every prompt in full,
whatever form the golden stores it in) and "<prompt>/greedy" [n] int32.

llama.cpp keeps its KV cache in float16 by default (--kv-cache f16): keys and values are rounded
to 11 significant bits before attention reads them. --kv-cache f32 keeps them in float32. Even
then its arithmetic is not minigemma's: GELU comes from a float16 table, and the matrix products
of a bf16 or quantized GGUF round the activations to bfloat16 or to 8 bits. tests/test_llama_cpp.py
measures what each costs.

This file imports nothing from minigemma (it reads golden.json with json): it also runs as
`PYTHON -I path/to/llama_cpp_peer.py ...` under any Python where llama_cpp and numpy import.
Shape legend: T prompt tokens, V vocab, n greedy tokens.
"""

import argparse
import json
import os
import sys

import numpy as np

KV_CACHE_TYPES = {"f16": "GGML_TYPE_F16", "f32": "GGML_TYPE_F32"}  # names in llama_cpp


def read_golden_inputs(golden):
    """What llama.cpp needs from a golden directory: ({prompt: token ids}, greedy tokens to
    generate), read from golden.json (the format of tests/conformance/README.md)."""
    path = os.path.join(os.fspath(golden), "golden.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; a golden directory holds golden.json and "
                                f"golden.npz (written by `minigemma golden record`)")
    with open(path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != "minigemma-golden":
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected 'minigemma-golden'")
    prompts = {p["name"]: [int(i) for i in p["token_ids"]] for p in meta["prompts"]}
    return prompts, int(meta["generation"]["new_tokens"])


def open_model(gguf, n_ctx, kv_cache="f16", threads=None):
    """A llama_cpp.Llama on a GGUF file, keeping the logits of every evaluated position, with
    room for n_ctx positions evaluated in one batch."""
    import llama_cpp  # the optional peer: imported only when llama.cpp is asked for

    if not os.path.isfile(gguf):
        raise FileNotFoundError(f"{gguf}: GGUF file not found")
    if kv_cache not in KV_CACHE_TYPES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache!r}")
    threads = threads or os.cpu_count()
    kv_type = getattr(llama_cpp, KV_CACHE_TYPES[kv_cache])
    try:
        return llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                               n_threads=threads, n_threads_batch=threads, type_k=kv_type,
                               type_v=kv_type, verbose=False)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file: ..."
        raise ValueError(f"{gguf}: llama.cpp could not load it ({e})") from None


def run_prompt(llm, ids, new_tokens):
    """llama.cpp's logits at every position of one prompt and its greedy continuation.
    -> {"tokens": [T] int32, "logits": [T, V] float32, "greedy": [n] int32}"""
    vocab = llm.n_vocab()
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the GGUF's vocabulary of {vocab}: "
                         f"is this the model the golden was recorded from?")
    llm.reset()                                  # n_tokens = 0: the next eval clears the cache
    llm.eval(ids)                                # one batch; logits_all keeps every row
    logits = np.array(llm.scores[:len(ids)], np.float32)
    greedy = []
    for _ in range(new_tokens):
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if len(greedy) < new_tokens:
            llm.eval([greedy[-1]])
    return {"tokens": np.asarray(ids, np.int32), "logits": logits,
            "greedy": np.asarray(greedy, np.int32)}


def run(gguf, prompts, new_tokens, *, kv_cache="f16", threads=None, progress=None):
    """{prompt: run_prompt arrays} for {prompt: token ids}, all through one llama.cpp context."""
    if not prompts:
        raise ValueError("no prompts to run")
    n_ctx = max(len(ids) for ids in prompts.values()) + new_tokens
    llm = open_model(gguf, n_ctx, kv_cache, threads)
    try:
        results = {}
        for name, ids in prompts.items():
            results[name] = run_prompt(llm, ids, new_tokens)
            if progress:
                progress(f"{name}: {len(ids)} tokens, {new_tokens} greedy tokens")
        return results
    finally:
        llm.close()


def save(out, results):
    """Write {prompt: {array: value}} as "<prompt>/<array>" into an .npz, all or nothing."""
    arrays = {f"{name}/{key}": value for name, result in results.items()
              for key, value in result.items()}
    partial = out + ".partial.npz"               # np.savez appends .npz to names without it
    np.savez(partial, **arrays)
    os.replace(partial, out)


# ----------------------------------------------------------------------------------------------
# Command line: `python -m minigemma.llama_cpp_peer` (add_arguments + main's body as `run_cli`,
# for a `minigemma golden` subcommand too)


def add_arguments(parser):
    parser.add_argument("golden", help="golden directory (its golden.json gives the token ids)")
    parser.add_argument("gguf", help="the model as a GGUF file")
    parser.add_argument("out", help=".npz to write: '<prompt>/logits', '<prompt>/greedy'")
    parser.add_argument("--kv-cache", choices=sorted(KV_CACHE_TYPES), default="f16",
                        help="llama.cpp's KV cache type (default f16, llama.cpp's own default)")
    parser.add_argument("--threads", type=int, help="default: every core")


def run_cli(args):
    prompts, new_tokens = read_golden_inputs(args.golden)
    results = run(args.gguf, prompts, new_tokens, kv_cache=args.kv_cache, threads=args.threads,
                  progress=lambda line: print(line, file=sys.stderr, flush=True))
    save(args.out, results)
    print(f"wrote {args.out}: llama.cpp on {args.gguf} ({args.kv_cache} KV cache), "
          f"{len(results)} prompts", file=sys.stderr)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minigemma.llama_cpp_peer",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
