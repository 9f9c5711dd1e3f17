"""`minigemma bench`: decode, first-token, prefill and batch speed on the true 2B (or 7B) shape,
beside its peers.

    minigemma bench [--shape 2b | --checkpoint DIR] [--tokens 32] [--prompt 512] [--reps 3]
                    [--batch 8] [--busy-core] [--peers minigemma,hf-bf16,hf-f32,llama.cpp]
                    [--llama-python PY --gguf-converter SCRIPT]

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

What is measured, per peer (median of --reps repetitions unless said):
    decode    tok/s over --tokens greedy steps after an 8-token prompt, and from it the effective
              read bandwidth (checkpoint bytes per token x tok/s) and the % of the roofline;
    roofline  a memory-bandwidth probe (numba, all threads, sums a 1 GB array), run before each
              peer and at the end; its best reading divided by the bytes one decoded token must
              read (every weight, once);
    first token  time to first token for an 8-token prompt in a fresh process: load + the first
              forward over the prompt (first touch of the mapped weights included), once per
              worker; and the same prompt prefilled again ("8-token prefill", warm);
    prefill   seconds for one forward pass over a --prompt-token prompt (logits of the last
              token), its GFLOP/s (the model's multiply-adds: linear layers, causal attention,
              one row of logits) and that as a % of this machine's float32 matrix-multiply peak:
              NumPy's own sgemm, measured in a worker of its own in the same run;
    batch     tok/s of --batch sequences decoded together (one token of each per step; their
              8-token prompts differ), and that over the peer's one-sequence decode speed;
    load      seconds from load() to a ready model; numba's compile / cache-load time, measured
              after load and apart from every other time, has its own line.
--busy-core keeps one core busy with a spinning process (pinned to the last core) while each
peer is measured: how each behaves on a machine where something else is running.
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

PEERS = ("minigemma", "minigemma-1thread", "minigemma-exact", "hf-bf16", "hf-f32", "llama.cpp")
DEFAULT_PEERS = "minigemma,hf-bf16,hf-f32"
SHORT = 8  # tokens of the prompt before the decode steps, and of the first-token prompt


# ----------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line of measurements.


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def prompt_ids(n, vocab, offset=0):
    """n deterministic token ids, <bos> first, spread over the vocabulary (offset: another
    prompt of the same length)."""
    return [2] + [(7919 * (i + 97 * offset)) % (vocab - 200) + 100 for i in range(1, n)]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def greedy_tok_s(step, first_token, tokens):
    """tok/s of `tokens` greedy steps: step(token) -> the next token."""
    token = first_token
    start = time.perf_counter()
    for _ in range(tokens):
        token = step(token)
    return tokens / (time.perf_counter() - start)


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


def worker_sgemm(args):
    """This machine's float32 matrix-multiply peak: NumPy's sgemm (its BLAS, all its threads) on
    the shapes of a 512-token prefill, the best median over the shapes, in GFLOP/s."""
    import numpy as np

    rng = np.random.default_rng(0)
    best = 0.0
    for m, k, n in ((args.prompt, 2048, 16384), (args.prompt, 2048, 2048), (2048, 2048, 2048)):
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((n, k), dtype=np.float32)
        a @ b.T
        seconds = statistics.median(timed(lambda: a @ b.T)[0] for _ in range(5))
        best = max(best, 2 * m * k * n / seconds / 1e9)
    return {"gflop_s": best}


def worker_minigemma(args, reproducible=False, threads=None):
    """minigemma: prompts and steps on the decode engine (decode.Decoder: numba kernels; threads:
    None follows what measures faster, 1 is the one-thread reference of --busy-core)."""
    import numpy as np

    import minigemma
    from minigemma.decode import Decoder
    load_s, model = timed(lambda: minigemma.load(args.checkpoint))
    V = model.config.n_real_tokens
    decoder = Decoder(model, reproducible=reproducible, threads=threads)
    compile_s, _ = timed(decoder.warm_up)
    short = prompt_ids(SHORT, V)
    cache = model.new_cache(SHORT + args.tokens * args.reps + 1)
    first_s, logits = timed(lambda: decoder.prefill(short, cache))  # [V]
    warm = [timed(lambda: decoder.prefill(short, model.new_cache(SHORT)))[0]
            for _ in range(args.reps)]

    token = int(np.argmax(logits))
    decode = [greedy_tok_s(lambda t: int(np.argmax(decoder.step(t, cache))), token, args.tokens)
              for _ in range(args.reps)]

    batch = []
    for _ in range(args.reps):
        prompts = [prompt_ids(SHORT, V, offset=b) for b in range(args.batch)]
        caches = [model.new_cache(SHORT + args.tokens) for _ in prompts]
        tokens = [int(t) for t in np.argmax(decoder.prefill_many(prompts, caches), axis=1)]
        start = time.perf_counter()
        for _ in range(args.tokens):
            tokens = [int(t) for t in np.argmax(decoder.step_many(tokens, caches), axis=1)]
        batch.append(args.batch * args.tokens / (time.perf_counter() - start))

    prompt = prompt_ids(args.prompt, V)
    prefill = [timed(lambda: decoder.prefill(prompt, model.new_cache(args.prompt)))[0]
               for _ in range(args.prefill_reps)]
    return {"decode_tok_s": decode, "prefill_s": prefill, "load_s": load_s,
            "ttft_s": load_s + first_s, "short_prefill_s": warm, "batch_tok_s": batch,
            "compile_s": compile_s, "peak_rss_gb": peak_rss_gb(),
            "threads": decoder.threads.most}


def worker_hf(args, dtype_name):
    """transformers' GemmaForCausalLM on CPU, eager attention, in bfloat16 or float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import GemmaForCausalLM

    torch.set_num_threads(os.cpu_count())
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype_name]
    load_s, model = timed(lambda: GemmaForCausalLM.from_pretrained(
        args.checkpoint, dtype=dtype, attn_implementation="eager").eval())
    V = model.config.vocab_size

    def step(ids, past):  # ids [B, T] -> logits [B, V] of each row's last token, cache
        out = model(torch.tensor(ids), past_key_values=past, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    with torch.no_grad():
        short = prompt_ids(SHORT, V)
        first_s, (logits, past) = timed(lambda: step([short], None))
        warm = [timed(lambda: step([short], None))[0] for _ in range(args.reps)]
        decode = []
        for _ in range(args.reps):
            token = int(torch.argmax(logits[0]))
            start = time.perf_counter()
            for _ in range(args.tokens):
                logits, past = step([[token]], past)
                token = int(torch.argmax(logits[0]))
            decode.append(args.tokens / (time.perf_counter() - start))
        batch = []
        for _ in range(args.reps):  # prompts of one length: no padding, no attention mask
            logits, past = step([prompt_ids(SHORT, V, offset=b) for b in range(args.batch)], None)
            start = time.perf_counter()
            for _ in range(args.tokens):
                logits, past = step(torch.argmax(logits, dim=-1)[:, None].tolist(), past)
            batch.append(args.batch * args.tokens / (time.perf_counter() - start))
        prompt = prompt_ids(args.prompt, V)
        prefill = [timed(lambda: step([prompt], None))[0] for _ in range(args.prefill_reps)]
    return {"decode_tok_s": decode, "prefill_s": prefill, "load_s": load_s,
            "ttft_s": load_s + first_s, "short_prefill_s": warm, "batch_tok_s": batch,
            "peak_rss_gb": peak_rss_gb(), "threads": torch.get_num_threads()}


def worker_llama(args):
    """llama.cpp through llama-cpp-python on a bfloat16 GGUF of the same weights (one sequence
    per context: the batch row does not apply)."""
    import llama_cpp

    threads = os.cpu_count()
    n_ctx = args.prompt + SHORT + args.tokens * args.reps
    load_s, llm = timed(lambda: llama_cpp.Llama(args.gguf, n_ctx=n_ctx, n_batch=args.prompt,
                                                n_threads=threads, n_threads_batch=threads,
                                                verbose=False))
    short = prompt_ids(SHORT, llm.n_vocab())
    first_s, _ = timed(lambda: llm.eval(short))
    next_token = lambda: int(llm.scores[llm.n_tokens - 1].argmax())

    def step(token):
        llm.eval([token])
        return next_token()

    decode = [greedy_tok_s(step, next_token(), args.tokens) for _ in range(args.reps)]
    warm = []
    for _ in range(args.reps):
        llm.reset()  # empties the KV cache
        warm.append(timed(lambda: llm.eval(short))[0])
    prompt = prompt_ids(args.prompt, llm.n_vocab())
    prefill = []
    for _ in range(args.prefill_reps):
        llm.reset()
        prefill.append(timed(lambda: llm.eval(prompt))[0])
    return {"decode_tok_s": decode, "prefill_s": prefill, "load_s": load_s,
            "ttft_s": load_s + first_s, "short_prefill_s": warm, "peak_rss_gb": peak_rss_gb(),
            "threads": threads}


def run_worker(settings):
    """Run the worker a JSON object of settings names; print its measurements as one JSON line."""
    args = types.SimpleNamespace(**json.loads(settings))
    work = {"probe": worker_probe,
            "sgemm": worker_sgemm,
            "minigemma": worker_minigemma,
            "minigemma-1thread": lambda a: worker_minigemma(a, threads=1),
            "minigemma-exact": lambda a: worker_minigemma(a, reproducible=True),
            "hf-bf16": lambda a: worker_hf(a, "bf16"),
            "hf-f32": lambda a: worker_hf(a, "f32"),
            "llama.cpp": worker_llama}[args.worker]
    print(json.dumps(work(args)), flush=True)


# ----------------------------------------------------------------------------------------------
# The driver: checkpoint, one subprocess per peer, the tables.


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
    # The checkpoint's tokenizer.model (the tiny one padded to 256000 pieces) will do for it.
    with full_size_lock():
        subprocess.run([sys.executable, args.gguf_converter, args.checkpoint, "--outtype", "bf16",
                        "--outfile", args.gguf + ".partial"], check=True)
    os.replace(args.gguf + ".partial", args.gguf)


def worker_command(args, worker):
    """The command line of one worker: its settings as a JSON object on argv."""
    settings = json.dumps({"worker": worker, "checkpoint": args.checkpoint, "gguf": args.gguf,
                           "tokens": args.tokens, "prompt": args.prompt, "reps": args.reps,
                           "prefill_reps": args.prefill_reps, "batch": args.batch})
    if worker.startswith("minigemma"):
        return [sys.executable, "-m", "minigemma.bench", settings]
    python = args.llama_python if worker == "llama.cpp" else sys.executable
    return [python, "-I", os.path.abspath(__file__), settings]  # this file alone (see top)


def busy_core():
    """A process spinning on the last core (a busy machine, for --busy-core); stop it with
    .kill(). It is pure Python: it holds no memory bandwidth, only the core."""
    spin = ("import os; os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})\n"
            "while True: pass")
    return subprocess.Popen([sys.executable, "-I", "-c", spin])


def measure(args, worker, busy=False):
    """Run one worker in a fresh process, holding the full-size lock (and, if busy, with a core
    kept busy); its JSON result or None."""
    from .cache import full_size_lock

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print(f"  measuring {worker}{' with a busy core' if busy else ''} ...", file=sys.stderr,
          flush=True)
    with full_size_lock():
        spinner = busy_core() if busy else None
        try:
            done = subprocess.run(worker_command(args, worker), env=env, capture_output=True,
                                  text=True)
        finally:
            if spinner:
                spinner.kill()
                spinner.wait()
    if done.returncode != 0:
        print(f"  {worker} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkpoint_bytes(directory):
    """Bytes one decoded token reads: every weight of the checkpoint once (lm_head is tied)."""
    from .formats import safetensors

    tensors = safetensors.read_checkpoint(directory)
    return sum(t.nbytes for name, t in tensors.items() if name != "lm_head.weight")


def prefill_gflop(config, T):
    """Multiply-adds x 2 of a T-token prefill, in GFLOP: every linear layer for T tokens, causal
    attention (query t reads t + 1 positions) and the logits of the last token."""
    c = config
    linear = c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim \
        + c.n_heads * c.head_dim * c.d_model + 3 * c.d_model * c.ffn_dim       # per layer
    attention = 2 * c.n_heads * c.head_dim * T * (T + 1) / 2                   # QK^T and PV
    return (c.n_layers * (2 * T * linear + 2 * attention) + 2 * c.d_model * c.n_real_tokens) / 1e9


def cpu_model():
    """lscpu's "Model name" (else /proc/cpuinfo's, else the platform's)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine():
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu_model()}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, "
            f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")


def median(result, key):
    """The median of a peer's measurements of `key`, or None where it was not measured."""
    return statistics.median(result[key]) if result.get(key) else None


def fmt(value, spec, unit=""):
    return "n/a" if value is None else format(value, spec) + unit


def speedup(ours, theirs, key, higher_is_faster):
    """minigemma's speed-up over a peer on one measurement (> 1: minigemma is faster)."""
    a, b = median(ours, key), median(theirs, key)
    return None if not (a and b) else a / b if higher_is_faster else b / a


def tables(results, probe, sgemm, bytes_per_token, gflop, args, label):
    """The results as markdown tables: each peer's speeds, then minigemma's ratio to each."""
    roofline = probe["gb_s_max"] * 1e9 / bytes_per_token
    peak = sgemm["gflop_s"] if sgemm else None
    lines = [f"{label} ({bytes_per_token / 1e9:.2f} GB read per token); memory probe "
             f"{probe['gb_s_max']:.1f} GB/s (best reading) with {probe['threads']} threads -> "
             f"roofline {roofline:.2f} tok/s; NumPy sgemm peak {fmt(peak, '.1f')} GFLOP/s; "
             f"{args.prompt}-token prefill = {gflop:.0f} GFLOP"
             + ("; one core kept busy while each peer ran" if args.busy_core else ""),
             "",
             f"| peer | decode tok/s | % roofline | first token, {SHORT}-token prompt (s) | "
             f"{SHORT}-token prefill, warm (s) | prefill {args.prompt} tok (s) | prefill GFLOP/s "
             f"| % sgemm peak | batch of {args.batch}: tok/s | batch / one sequence | load (s) | "
             f"peak RSS (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        tok_s, batch = median(r, "decode_tok_s"), median(r, "batch_tok_s")
        rate = gflop / median(r, "prefill_s")
        lines.append(
            f"| {name} | {tok_s:.2f} | {100 * tok_s / roofline:.0f} % | {r['ttft_s']:.2f} | "
            f"{median(r, 'short_prefill_s'):.2f} | {median(r, 'prefill_s'):.2f} | {rate:.1f} | "
            f"{fmt(peak and 100 * rate / peak, '.0f', ' %')} | {fmt(batch, '.2f')} | "
            f"{fmt(batch and batch / tok_s, '.2f', 'x')} | {r['load_s']:.2f} | "
            f"{r['peak_rss_gb']:.2f} |")
    ours = results.get("minigemma")
    if ours and len(results) > 1:
        lines += ["", "minigemma's speed-up over each peer (> 1: minigemma is faster):", "",
                  f"| peer | decode | first token | {SHORT}-token prefill | prefill | batch |",
                  "|---|---|---|---|---|---|"]
        for name, r in results.items():
            if name != "minigemma":
                lines.append(
                    f"| {name} | {fmt(speedup(ours, r, 'decode_tok_s', True), '.2f', 'x')} | "
                    f"{r['ttft_s'] / ours['ttft_s']:.2f}x | "
                    f"{fmt(speedup(ours, r, 'short_prefill_s', False), '.2f', 'x')} | "
                    f"{fmt(speedup(ours, r, 'prefill_s', False), '.2f', 'x')} | "
                    f"{fmt(speedup(ours, r, 'batch_tok_s', True), '.2f', 'x')} |")
    if ours:
        lines.append(f"\nminigemma: numba kernel compile / cache load {ours['compile_s']:.2f} s, "
                     f"done before load and outside every time above.")
    lines.append(f"decode: median of {args.reps} x {args.tokens} tokens; batch: median of "
                 f"{args.reps} x {args.tokens} steps of {args.batch} sequences; {SHORT}-token "
                 f"prefill: median of {args.reps}; prefill: median of {args.prefill_reps}; first "
                 f"token: once per fresh process; float32 compute for minigemma and hf-f32.\n"
                 f"Load average {os.getloadavg()[0]:.1f} at the end (other processes on the "
                 f"cores slow every peer).")
    return "\n".join(lines)


def run(args):
    """The benchmark, from the arguments cli.py parsed. -> exit code (1 if a measurement failed)"""
    for name, default in (("batch", 8), ("busy_core", False)):  # options newer than some callers
        setattr(args, name, getattr(args, name, default))
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"bench: --peers: unknown peer {unknown[0]!r} "
                         f"(choose from {', '.join(PEERS)})")
    if "llama.cpp" in peers and not args.llama_python:
        raise ValueError("bench: llama.cpp needs --llama-python, a Python where llama_cpp imports")
    if args.batch < 1:
        raise ValueError(f"bench: --batch must be >= 1, got {args.batch}")
    label = args.checkpoint or f"{args.shape.upper()} shape, bf16 weights"
    ensure_checkpoint(args)
    if "llama.cpp" in peers:
        ensure_gguf(args)
    from .config import from_hf_config

    print(f"machine: {machine()}", flush=True)
    sgemm = measure(args, "sgemm")
    probes, results = [], {}
    for peer in peers:  # a probe before each peer: other processes come and go
        probes.append(measure(args, "probe"))
        result = measure(args, peer, busy=args.busy_core)
        if result is not None:
            results[peer] = result
            print(f"  {peer}: {json.dumps(result)}", file=sys.stderr, flush=True)
    probes.append(measure(args, "probe"))
    if not any(probes):
        print("bench: every memory probe failed (see above); no table", file=sys.stderr)
        return 1
    probe = max((p for p in probes if p), key=lambda p: p["gb_s_max"])
    with open(os.path.join(args.checkpoint, "config.json")) as f:
        gflop = prefill_gflop(from_hf_config(json.load(f)), args.prompt)
    print(tables(results, probe, sgemm, checkpoint_bytes(args.checkpoint), gflop, args, label))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "probes": probes, "sgemm": sgemm,
                       "results": results}, f, indent=1)
    return 0 if len(results) == len(peers) and all(probes) and sgemm else 1


if __name__ == "__main__":
    run_worker(sys.argv[1])
