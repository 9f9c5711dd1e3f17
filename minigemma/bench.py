"""`minigemma bench`: decode and prefill speed on the true 2B (or 7B) shape, beside its peers.

    minigemma bench [--shape 2b | --checkpoint DIR] [--tokens 32] [--prompt 512] [--reps 3]
                    [--peers minigemma,hf-bf16,hf-f32] [--llama-python PY --gguf-converter SCRIPT]

All peers run the same checkpoint: --checkpoint DIR, or else the seeded random bfloat16 one of
--shape (random_checkpoint.py, generated into minigemma's cache directory on first use). Each
measurement runs in its own subprocess, so memory peaks do not add up and each peak RSS is that
peer's own, and the driver holds cache.full_size_lock() while a worker runs, so no two full-size
models are in memory at once. The options are declared in cli.py; run(args) takes them parsed.

A worker gets its settings as one JSON object on argv. The minigemma workers run as
`python -m minigemma.bench WORKER_JSON`. The others run this file alone, `PYTHON -I
path/to/bench.py WORKER_JSON` (-I keeps the directory of this file off sys.path, so its modules
shadow nothing), importing nothing of minigemma: its ~80 MB of imports would count in their peak
RSS, and --llama-python, a Python where llama_cpp imports, need not have minigemma at all. So this
file imports only the standard library at the top; the driver imports minigemma in its functions.

What is measured, per peer (median of --reps repetitions):
    decode    tok/s over --tokens greedy steps after an 8-token prompt, and from it the effective
              read bandwidth (checkpoint bytes per token x tok/s) and the % of the roofline;
    roofline  a memory-bandwidth probe (numba, all threads, sums a 1 GB array), run before each
              peer and at the end; its best reading divided by the bytes one decoded token must
              read (every weight, once);
    prefill   seconds for one forward pass over a --prompt-token prompt (logits of the last token);
    load      seconds from load() to a ready model; time to first token = load + the first forward
              over the 8-token prompt in a fresh process (first touch of the mapped weights
              included); numba's compile / cache-load time, measured after load and apart from
              every other time, has its own line.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types

PEERS = ("minigemma", "minigemma-exact", "hf-bf16", "hf-f32", "llama.cpp")
DEFAULT_PEERS = "minigemma,hf-bf16,hf-f32"
SHORT = 8  # tokens of the prompt before the decode steps


# ----------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line of measurements.


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def prompt_ids(n, vocab):
    """n deterministic token ids, <bos> first, spread over the vocabulary."""
    return [2] + [(7919 * i) % (vocab - 200) + 100 for i in range(1, n)]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def worker_probe(args):
    """Read bandwidth of this machine: all numba threads summing a 1 GB array, 10 times."""
    import numba
    import numpy as np

    @numba.njit(parallel=True, cache=True)
    def read_all(a):  # a [rows, cols] uint64: each thread sums whole rows
        sums = np.zeros(a.shape[0], np.uint64)
        for r in numba.prange(a.shape[0]):
            s = np.uint64(0)
            for c in range(a.shape[1]):
                s += a[r, c]
            sums[r] = s
        return sums.sum()

    data = np.ones((1 << 14, 1 << 13), np.uint64)
    read_all(data)
    times = [timed(lambda: read_all(data))[0] for _ in range(10)]
    return {"gb_s": data.nbytes / statistics.median(times) / 1e9,
            "gb_s_max": data.nbytes / min(times) / 1e9, "threads": numba.get_num_threads()}


def worker_minigemma(args, reproducible=False):
    """minigemma: prefill with Gemma.forward, decode on the numba kernels (decode.Decoder)."""
    import numpy as np

    import minigemma
    from minigemma.decode import Decoder
    load_s, model = timed(lambda: minigemma.load(args.checkpoint))
    c = model.config
    decoder = Decoder(model, reproducible=reproducible)
    compile_s, _ = timed(decoder.warm_up)
    cache = model.new_cache(SHORT + args.tokens * args.reps + 1)
    short = prompt_ids(SHORT, c.n_real_tokens)
    first_s, logits = timed(lambda: model.forward(short, cache, last_only=True)[0])  # [V]

    decode = []
    for _ in range(args.reps):
        token = int(np.argmax(logits))
        start = time.perf_counter()
        for _ in range(args.tokens):
            logits = decoder.step(token, cache)
            token = int(np.argmax(logits))
        decode.append(args.tokens / (time.perf_counter() - start))

    prompt = prompt_ids(args.prompt, c.n_real_tokens)
    prefill = [timed(lambda: model.forward(prompt, last_only=True))[0]
               for _ in range(args.prefill_reps)]
    return {"decode_tok_s": decode, "prefill_s": prefill, "load_s": load_s,
            "ttft_s": load_s + first_s, "compile_s": compile_s, "peak_rss_gb": peak_rss_gb()}


def worker_hf(args, dtype_name):
    """transformers' GemmaForCausalLM on CPU, eager attention, in bfloat16 or float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import GemmaForCausalLM

    torch.set_num_threads(os.cpu_count())
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype_name]
    load_s, model = timed(lambda: GemmaForCausalLM.from_pretrained(
        args.checkpoint, dtype=dtype, attn_implementation="eager").eval())

    def step(ids, past):
        out = model(torch.tensor([ids]), past_key_values=past, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1], out.past_key_values

    with torch.no_grad():
        short = prompt_ids(SHORT, model.config.vocab_size)
        first_s, (logits, past) = timed(lambda: step(short, None))
        decode = []
        for _ in range(args.reps):
            token = int(torch.argmax(logits))
            start = time.perf_counter()
            for _ in range(args.tokens):
                logits, past = step([token], past)
                token = int(torch.argmax(logits))
            decode.append(args.tokens / (time.perf_counter() - start))
        prompt = prompt_ids(args.prompt, model.config.vocab_size)
        prefill = [timed(lambda: step(prompt, None))[0] for _ in range(args.prefill_reps)]
    return {"decode_tok_s": decode, "prefill_s": prefill, "load_s": load_s,
            "ttft_s": load_s + first_s, "peak_rss_gb": peak_rss_gb(),
            "threads": torch.get_num_threads()}


def worker_llama(args):
    """llama.cpp through llama-cpp-python on a bfloat16 GGUF of the same weights."""
    import llama_cpp

    threads = os.cpu_count()
    n_ctx = args.prompt + SHORT + args.tokens * args.reps
    load_s, llm = timed(lambda: llama_cpp.Llama(args.gguf, n_ctx=n_ctx, n_batch=args.prompt,
                                                n_threads=threads, n_threads_batch=threads,
                                                verbose=False))

    first_s, _ = timed(lambda: llm.eval(prompt_ids(SHORT, llm.n_vocab())))
    decode = []
    for _ in range(args.reps):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        start = time.perf_counter()
        for _ in range(args.tokens):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        decode.append(args.tokens / (time.perf_counter() - start))
    prompt = prompt_ids(args.prompt, llm.n_vocab())
    prefill = []
    for _ in range(args.prefill_reps):
        llm.reset()  # empties the KV cache
        prefill.append(timed(lambda: llm.eval(prompt))[0])
    return {"decode_tok_s": decode, "prefill_s": prefill, "load_s": load_s,
            "ttft_s": load_s + first_s, "peak_rss_gb": peak_rss_gb(), "threads": threads}


def run_worker(settings):
    """Run the worker a JSON object of settings names; print its measurements as one JSON line."""
    args = types.SimpleNamespace(**json.loads(settings))
    work = {"probe": worker_probe,
            "minigemma": worker_minigemma,
            "minigemma-exact": lambda a: worker_minigemma(a, reproducible=True),
            "hf-bf16": lambda a: worker_hf(a, "bf16"),
            "hf-f32": lambda a: worker_hf(a, "f32"),
            "llama.cpp": worker_llama}[args.worker]
    print(json.dumps(work(args)), flush=True)


# ----------------------------------------------------------------------------------------------
# The driver: checkpoint, one subprocess per peer, the table.


def ensure_checkpoint(args):
    """--checkpoint as given, or the random checkpoint of --shape, generated on first use."""
    from . import random_checkpoint
    from .cache import full_size_lock

    if args.checkpoint is None:
        args.checkpoint = random_checkpoint.default_dir(args.shape)
        with full_size_lock():  # drawing the 2B embedding takes ~2 GB
            random_checkpoint.ensure(args.checkpoint, args.shape)
    elif not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"bench: --checkpoint {args.checkpoint}: no such directory")


def ensure_gguf(args):
    """A bfloat16 GGUF of the checkpoint, converted once by llama.cpp's convert_hf_to_gguf.py."""
    from .cache import full_size_lock

    args.gguf = args.gguf or args.checkpoint.rstrip("/") + "-bf16.gguf"
    if os.path.exists(args.gguf):
        return
    if not args.gguf_converter:
        raise ValueError("bench: llama.cpp needs --gguf FILE or --gguf-converter "
                         "path/to/convert_hf_to_gguf.py (in the llama-cpp-python source package)")
    # The checkpoint's tokenizer.model (the tiny one padded to 256000 pieces) satisfies the converter.
    with full_size_lock():
        subprocess.run([sys.executable, args.gguf_converter, args.checkpoint, "--outtype", "bf16",
                        "--outfile", args.gguf + ".partial"], check=True)
    os.replace(args.gguf + ".partial", args.gguf)


def worker_command(args, worker):
    """The command line of one worker: its settings as a JSON object on argv."""
    settings = json.dumps({"worker": worker, "checkpoint": args.checkpoint, "gguf": args.gguf,
                           "tokens": args.tokens, "prompt": args.prompt, "reps": args.reps,
                           "prefill_reps": args.prefill_reps})
    if worker in ("minigemma", "minigemma-exact"):
        return [sys.executable, "-m", "minigemma.bench", settings]
    python = args.llama_python if worker == "llama.cpp" else sys.executable
    return [python, "-I", os.path.abspath(__file__), settings]  # this file alone (see top)


def measure(args, worker):
    """Run one worker in a fresh process, holding the full-size lock; its JSON result or None."""
    from .cache import full_size_lock

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print(f"  measuring {worker} ...", file=sys.stderr, flush=True)
    with full_size_lock():
        done = subprocess.run(worker_command(args, worker), env=env, capture_output=True,
                              text=True)
    if done.returncode != 0:
        print(f"  {worker} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkpoint_bytes(directory):
    """Bytes one decoded token reads: every weight of the checkpoint once (lm_head is tied)."""
    from .formats import safetensors

    tensors = safetensors.read_checkpoint(directory)
    return sum(t.nbytes for name, t in tensors.items() if name != "lm_head.weight")


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, "
            f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")


def table(results, probe, bytes_per_token, args, label):
    """The results as a markdown table, minigemma's ratio to each peer in the last columns."""
    med = statistics.median
    roofline = probe["gb_s_max"] * 1e9 / bytes_per_token
    ours = results.get("minigemma")
    lines = [f"{label} ({bytes_per_token / 1e9:.2f} GB read per "
             f"token); memory probe {probe['gb_s_max']:.1f} GB/s (best reading) with "
             f"{probe['threads']} threads -> roofline {roofline:.2f} tok/s",
             "",
             f"| peer | decode tok/s | GB/s | % roofline | prefill {args.prompt} tok (s) "
             "| load (s) | first token (s) | peak RSS (GB) | minigemma speed-up decode / prefill |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        tok_s, prefill = med(r["decode_tok_s"]), med(r["prefill_s"])
        ratio = ""
        if ours and name != "minigemma":
            speedup = med(ours["decode_tok_s"]) / tok_s, prefill / med(ours["prefill_s"])
            ratio = f"{speedup[0]:.2f}x / {speedup[1]:.2f}x"
        lines.append(f"| {name} | {tok_s:.2f} | {tok_s * bytes_per_token / 1e9:.1f} | "
                     f"{100 * tok_s / roofline:.0f} % | {prefill:.2f} | {r['load_s']:.2f} | "
                     f"{r['ttft_s']:.2f} | {r['peak_rss_gb']:.2f} | {ratio} |")
    if ours:
        lines.append(f"\nminigemma: numba kernel compile / cache load {ours['compile_s']:.2f} s, "
                     f"done before load and outside every time above.")
    lines.append(f"decode: median of {args.reps} x {args.tokens} tokens; prefill: median of "
                 f"{args.prefill_reps}; float32 compute for minigemma and hf-f32.\n"
                 f"Load average {os.getloadavg()[0]:.1f} at the end (other processes on the "
                 f"cores slow every peer).")
    return "\n".join(lines)


def run(args):
    """The benchmark, from the arguments cli.py parsed. -> exit code (1 if a measurement failed)"""
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"bench: --peers: unknown peer {unknown[0]!r} "
                         f"(choose from {', '.join(PEERS)})")
    if "llama.cpp" in peers and not args.llama_python:
        raise ValueError("bench: llama.cpp needs --llama-python, a Python where llama_cpp imports")
    label = args.checkpoint or f"{args.shape.upper()} shape, bf16 weights"
    ensure_checkpoint(args)
    if "llama.cpp" in peers:
        ensure_gguf(args)
    print(f"machine: {machine()}", flush=True)
    probes, results = [], {}
    for peer in peers:  # a probe before each peer: other processes come and go
        probes.append(measure(args, "probe"))
        result = measure(args, peer)
        if result is not None:
            results[peer] = result
            print(f"  {peer}: {json.dumps(result)}", file=sys.stderr, flush=True)
    probes.append(measure(args, "probe"))
    if not any(probes):
        print("bench: every memory probe failed (see above); no table", file=sys.stderr)
        return 1
    probe = max((p for p in probes if p), key=lambda p: p["gb_s_max"])
    print(table(results, probe, checkpoint_bytes(args.checkpoint), args, label))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "probes": probes, "results": results}, f, indent=1)
    return 0 if len(results) == len(peers) and all(probes) else 1


if __name__ == "__main__":
    run_worker(sys.argv[1])
