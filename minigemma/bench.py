"""`minigemma bench`: decode, first-token, prefill and batch speed on the true 2B (or 7B) shape,
beside its peers; the same on quantized GGUFs and on a real model; a memory soak.

    minigemma bench [--shape 2b | --checkpoint DIR] [--tokens 32] [--prompt 512] [--reps 3]
                    [--batch 8] [--busy-core] [--peers minigemma,hf-bf16,hf-f32,llama.cpp]
                    [--llama-python PY --gguf-converter SCRIPT] [--quant q8_0,q4_k_m]
    minigemma bench --model gemma3-270m --llama-python PY [--tokens 32] [--reps 3]
    minigemma bench --soak [N] [--shape 2b | --checkpoint DIR | --model gemma3-270m]

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
    decode    tok/s over --tokens greedy steps after an 8-token prompt (each peer's argmax of
              its own logits of the last token), and from it the % of the roofline;
    roofline  a memory-bandwidth probe (numba, all threads, sums a 1 GB array), run before each
              peer and at the end; its best reading divided by the bytes one decoded token must
              read (every weight, once);
    first token  time to first token for an 8-token prompt in a fresh process: load + the first
              forward over the prompt (first touch of the mapped weights included), once per
              worker, with the peer's files in the page cache (read through just before, as on a
              second run: whichever peer ran first would otherwise pay for the disk); and the
              same prompt prefilled again ("8-token prefill", warm);
    prefill   seconds for one forward pass over a --prompt-token prompt (logits of the last
              token), its GFLOP/s (the model's multiply-adds: linear layers, causal attention,
              one row of logits) and that as a % of this machine's float32 matrix-multiply peak:
              NumPy's own sgemm, measured in a worker of its own in the same run;
    batch     tok/s of --batch sequences decoded together (one token of each per step; their
              8-token prompts differ), and that over the peer's one-sequence decode speed;
    load      seconds from load() to a ready model; numba's compile / cache-load time, measured
              after load and apart from every other time, has its own line;
    threads   the threads each peer computes with (its own report), in the tables; the header
              names the CPU (lscpu's model name) and its CPUs.
--busy-core keeps one core busy with a spinning process (pinned to the last core) while each
peer is measured: how each behaves on a machine where something else is running.

--quant q8_0,q4_k_m adds rows after the tables: each type is made once from the bf16 GGUF that
llama.cpp reads (CHECKPOINT-bf16.gguf) by llama.cpp's own quantizer (llama_model_quantize, its
default parameters, run under --llama-python), into CHECKPOINT-q8_0.gguf beside it, and remade
only when the bf16 GGUF is newer. minigemma (minigemma.load on the file: the blocks stay as stored,
decoded by the engine `minigemma generate` uses, sampling.decoder_for) and llama.cpp run on the
SAME file: first token, warm 8-token prefill, decode tok/s and its % of the roofline of that file
(the tensor bytes stored in it), and minigemma's speed-up over llama.cpp. The engine column says
whether minigemma's numba kernels read the weights as stored or Gemma.forward widened them.

--model gemma3-270m measures the same rows on a real model, the built-in Gemma 3 270M Q4_K_M
GGUF (builtin.py), for minigemma and llama.cpp, instead of the tables above.

--soak [N] (default 10000 steps) runs only a soak: minigemma decodes N greedy steps in one
process, its resident memory (/proc/self/statm: now, not the peak) sampled every 500 steps, and
prints the series, the growth (last sample - first) and a verdict: flat when the growth is under
SOAK_FLAT_MB. The KV cache is written through once before the first sample (so that filling it
is not counted as growth); when it is full (the model's max positions, or N + 8) it restarts:
its length goes back to 0 and the 8-token prompt is prefilled again into the same arrays.
"""

import json
import math
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
# --quant: name -> llama.cpp's file type (enum llama_ftype, as llama_cpp spells it)
QUANT_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
# --model: name -> what it is (the file comes from builtin.py; the peers are MODEL_PEERS)
MODELS = {"gemma3-270m": "Gemma 3 270M, the built-in Q4_K_M GGUF"}
MODEL_PEERS = ("minigemma", "llama.cpp")
SOAK_STEPS = 10000   # --soak without a number
SOAK_EVERY = 500     # steps between two samples of the resident memory
SOAK_FLAT_MB = 16.0  # growth under this is flat: a leak of 1.6 KB per step shows in 10000 steps


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


def rss_mb():
    """Resident memory of this process now (not its peak), in MB: /proc/self/statm's second field
    counts resident pages."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def greedy(step, first_token, tokens):
    """`tokens` greedy steps: step(token) -> the next token. -> (tok/s, the tokens: first_token
    and each one a step gave)"""
    out = [first_token]
    start = time.perf_counter()
    for _ in range(tokens):
        out.append(step(out[-1]))
    return tokens / (time.perf_counter() - start), out


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
    decode = [greedy(lambda t: int(np.argmax(decoder.step(t, cache))), token, args.tokens)[0]
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


def worker_minigemma_decode(args):
    """minigemma on any file it reads (a GGUF's quantized blocks stay as stored) through the engine
    `minigemma generate` runs (sampling.decoder_for): first token, warm 8-token prefill, decode."""
    import numpy as np

    import minigemma
    from minigemma.sampling import decoder_for
    load_s, model = timed(lambda: minigemma.load(args.checkpoint))
    V = model.config.n_real_tokens
    decoder = decoder_for(model)
    compile_s, _ = timed(decoder.warm_up)
    short = prompt_ids(SHORT, V)
    cache = model.new_cache(SHORT + args.tokens * args.reps)
    first_s, logits = timed(lambda: decoder.prefill(short, cache))  # [V]
    warm = [timed(lambda: decoder.prefill(short, model.new_cache(SHORT)))[0]
            for _ in range(args.reps)]
    runs = [greedy(lambda t: int(np.argmax(decoder.step(t, cache))), int(np.argmax(logits)),
                   args.tokens) for _ in range(args.reps)]
    return {"decode_tok_s": [r[0] for r in runs], "greedy": runs[0][1], "load_s": load_s,
            "ttft_s": load_s + first_s, "short_prefill_s": warm, "compile_s": compile_s,
            "peak_rss_gb": peak_rss_gb(), "threads": decoder.threads.most,
            "engine": "kernels" if decoder.on_kernels else "forward"}


def worker_soak(args):
    """minigemma decoding args.soak greedy steps in one process, its resident memory sampled every
    SOAK_EVERY steps (see the module docstring for the KV cache)."""
    import numpy as np

    import minigemma
    from minigemma.sampling import decoder_for
    model = minigemma.load(args.checkpoint)
    decoder = decoder_for(model)
    decoder.warm_up()
    short = prompt_ids(SHORT, model.config.n_real_tokens)
    cache = model.new_cache(min(model.config.max_positions, args.soak + SHORT))
    for arrays in (cache.k, cache.v):  # every page written once: filling it is not growth
        for a in (arrays if isinstance(arrays, list) else [arrays]):  # Gemma 3: one per layer
            a.fill(0)
    token = int(np.argmax(decoder.prefill(short, cache)))
    samples, restarts = [[0, rss_mb()]], 0
    start = time.perf_counter()
    for n in range(1, args.soak + 1):
        if cache.length == cache.max_len:  # full: start again from the prompt, same arrays
            cache.length, restarts = 0, restarts + 1
            token = int(np.argmax(decoder.prefill(short, cache)))
        token = int(np.argmax(decoder.step(token, cache)))
        if n % SOAK_EVERY == 0 or n == args.soak:
            samples.append([n, rss_mb()])
    return {"samples": samples, "restarts": restarts, "max_len": cache.max_len,
            "tok_s": args.soak / (time.perf_counter() - start), "threads": decoder.threads.most,
            "engine": "kernels" if decoder.on_kernels else "forward"}


def last_logits(llm):
    """llama.cpp's logits [V] of the last token evaluated. Without logits_all, Llama.eval asks
    for that one row alone and copies nothing into llm.scores (left unwritten): read the row from
    the context, as llama_get_logits_ith(ctx, -1) gives it."""
    import llama_cpp
    import numpy as np

    row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    if not row:
        raise RuntimeError("llama.cpp returned no logits for the last token")
    return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),))


def worker_llama(args):
    """llama.cpp through llama-cpp-python on a GGUF of the same weights (bfloat16 for the peer
    tables, the quantized file for --quant, the model's own for --model; one sequence per
    context: the batch row does not apply). args.prefill_reps 0 skips the long prefill."""
    import llama_cpp

    threads = os.cpu_count()
    n_ctx = args.prompt + SHORT + args.tokens * args.reps
    load_s, llm = timed(lambda: llama_cpp.Llama(args.gguf, n_ctx=n_ctx, n_batch=args.prompt,
                                                n_threads=threads, n_threads_batch=threads,
                                                verbose=False))
    short = prompt_ids(SHORT, llm.n_vocab())
    first_s, _ = timed(lambda: llm.eval(short))
    next_token = lambda: int(last_logits(llm).argmax())

    def step(token):
        llm.eval([token])
        return next_token()

    runs = [greedy(step, next_token(), args.tokens) for _ in range(args.reps)]
    warm = []
    for _ in range(args.reps):
        llm.reset()  # n_tokens = 0: the next eval empties the KV cache
        warm.append(timed(lambda: llm.eval(short))[0])
    prompt = prompt_ids(args.prompt, llm.n_vocab())
    prefill = []
    for _ in range(args.prefill_reps):
        llm.reset()
        prefill.append(timed(lambda: llm.eval(prompt))[0])
    return {"decode_tok_s": [r[0] for r in runs], "greedy": runs[0][1], "prefill_s": prefill,
            "load_s": load_s, "ttft_s": load_s + first_s, "short_prefill_s": warm,
            "peak_rss_gb": peak_rss_gb(), "threads": threads}


def worker_quantize(args):
    """llama.cpp's own quantizer (what llama-quantize calls), its default parameters: the GGUF
    args.gguf -> args.out, as the file type args.ftype (a llama_cpp LLAMA_FTYPE_* name)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, args.ftype)
    llama_cpp.llama_backend_init()
    seconds, status = timed(lambda: llama_cpp.llama_model_quantize(
        args.gguf.encode(), args.out.encode(), ctypes.byref(params)))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({args.gguf} -> {args.ftype}) returned {status}")
    return {"seconds": seconds}


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
            "minigemma-decode": worker_minigemma_decode,
            "soak": worker_soak,
            "llama.cpp": worker_llama,
            "quantize": worker_quantize}[args.worker]
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


def ensure_model(args):
    """--model: its GGUF file as the checkpoint (builtin.py joins the built-in one into the cache
    directory once)."""
    from .builtin import builtin_model_path

    args.checkpoint = args.gguf = builtin_model_path()


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


def quantized_path(gguf, kind):
    """Where the `kind` GGUF made from the bf16 GGUF lives: beside it (X-bf16.gguf ->
    X-q8_0.gguf)."""
    stem = gguf[:-len(".gguf")] if gguf.endswith(".gguf") else gguf
    return f"{stem[:-len('-bf16')] if stem.endswith('-bf16') else stem}-{kind}.gguf"


def ensure_quantized(args, kind):
    """The GGUF of the checkpoint quantized as `kind` by llama.cpp's own quantizer (run under
    --llama-python), made from the bf16 GGUF once, and again only if the bf16 GGUF is newer.
    Written under a temporary name, then renamed: a file with the final name is whole."""
    from .cache import full_size_lock

    path = quantized_path(args.gguf, kind)
    with full_size_lock():  # another bench may be making it: wait, then find it made
        if os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(args.gguf):
            return path
        print(f"  quantizing {args.gguf} -> {path} (llama.cpp's quantizer) ...", file=sys.stderr,
              flush=True)
        partial = path + ".partial"
        done = subprocess.run(worker_command(args, "quantize", out=partial,
                                             ftype=QUANT_TYPES[kind]),
                              capture_output=True, text=True)
        if done.returncode != 0:
            if os.path.exists(partial):
                os.remove(partial)
            raise ValueError(f"bench: llama.cpp could not quantize {args.gguf} to {kind}:\n"
                             f"{done.stderr[-2000:]}")
        os.replace(partial, path)
    return path


def worker_command(args, worker, **settings):
    """The command line of one worker: its settings as a JSON object on argv (`settings` replace
    or add to those taken from args)."""
    settings = {"worker": worker, "checkpoint": args.checkpoint, "gguf": args.gguf,
                "tokens": args.tokens, "prompt": args.prompt, "reps": args.reps,
                "prefill_reps": args.prefill_reps, "batch": args.batch, "soak": args.soak,
                **settings}
    if worker.startswith("minigemma") or worker == "soak":
        return [sys.executable, "-m", "minigemma.bench", json.dumps(settings)]
    python = args.llama_python if worker in ("llama.cpp", "quantize") else sys.executable
    return [python, "-I", os.path.abspath(__file__), json.dumps(settings)]  # this file alone


def busy_core():
    """A process spinning on the last core (a busy machine, for --busy-core); stop it with
    .kill(). It is pure Python: it holds no memory bandwidth, only the core."""
    spin = ("import os; os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})\n"
            "while True: pass")
    return subprocess.Popen([sys.executable, "-I", "-c", spin])


def measure(args, worker, busy=False, **settings):
    """Run one worker in a fresh process, holding the full-size lock (and, if busy, with a core
    kept busy); its JSON result or None. settings: as worker_command's."""
    from .cache import full_size_lock

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    on = settings.get("gguf") or settings.get("checkpoint")
    print(f"  measuring {worker}{f' on {os.path.basename(on)}' if on else ''}"
          f"{' with a busy core' if busy else ''} ...", file=sys.stderr, flush=True)
    with full_size_lock():
        if worker == "llama.cpp":
            read_through(settings.get("gguf") or args.gguf)
        elif worker not in ("sgemm", "probe"):  # the machine probes read no checkpoint
            read_through(settings.get("checkpoint") or args.checkpoint)
        spinner = busy_core() if busy else None
        try:
            done = subprocess.run(worker_command(args, worker, **settings), env=env,
                                  capture_output=True, text=True)
        finally:
            if spinner:
                spinner.kill()
                spinner.wait()
    if done.returncode != 0:
        print(f"  {worker} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_through(path):
    """Read a checkpoint (a file, or every file of a directory) once, into the page cache."""
    files = ([os.path.join(path, name) for name in sorted(os.listdir(path))]
             if os.path.isdir(path) else [path])
    buffer = bytearray(64 << 20)
    for name in files:
        with open(name, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def measure_on_gguf(args, peer, path):
    """One peer's decode and first-token row on a GGUF file (--quant, --model): minigemma through
    its decode engine, llama.cpp without the long prefill."""
    if peer == "minigemma":
        return measure(args, "minigemma-decode", busy=args.busy_core, checkpoint=path)
    return measure(args, "llama.cpp", busy=args.busy_core, gguf=path, prompt=SHORT,
                   prefill_reps=0)


def checkpoint_bytes(directory):
    """Bytes one decoded token reads: every weight of the checkpoint once (lm_head is tied)."""
    from .formats import safetensors

    tensors = safetensors.read_checkpoint(directory)
    return sum(t.nbytes for name, t in tensors.items() if name != "lm_head.weight")


def gguf_bytes(path):
    """Bytes one decoded token reads from a GGUF file: the data of every tensor stored in it, once
    (the tied output layer reads token_embd), in its stored type."""
    import gguf

    from .formats.gguf import GGUFFile

    total = 0
    for type_id, dims in GGUFFile(path).tensors.values():
        weights, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
        total += math.prod(dims) // weights * nbytes
    return total


def prefill_gflop(config, T):
    """Multiply-adds x 2 of a T-token prefill, in GFLOP: every linear layer for T tokens, causal
    attention (query t reads t + 1 positions) and the logits of the last token."""
    c = config
    linear = c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim \
        + c.n_heads * c.head_dim * c.d_model + 3 * c.d_model * c.ffn_dim       # per layer
    attention = 2 * c.n_heads * c.head_dim * T * (T + 1) / 2                   # QK^T and PV
    return (c.n_layers * (2 * T * linear + 2 * attention) + 2 * c.d_model * c.n_real_tokens) / 1e9


def lscpu():
    """lscpu's fields, {name: value} ({} where lscpu does not run)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return dict((k.strip(), v.strip()) for k, v in
                (line.split(":", 1) for line in out.splitlines() if ":" in line))


def cpu_model(fields):
    """lscpu's "Model name" (else /proc/cpuinfo's, else the platform's)."""
    if fields.get("Model name"):
        return fields["Model name"]
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine():
    """The header line: CPU model, CPUs (those this process may use; threads per core), memory,
    Python, load."""
    fields = lscpu()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    per_core = fields.get("Thread(s) per core")
    return (f"{cpu_model(fields)}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable"
            f"{f', {per_core} thread(s) per core' if per_core else ''}), {memory:.0f} GiB RAM, "
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
             f"peak RSS (GB) | threads |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        tok_s, batch = median(r, "decode_tok_s"), median(r, "batch_tok_s")
        rate = gflop / median(r, "prefill_s")
        lines.append(
            f"| {name} | {tok_s:.2f} | {100 * tok_s / roofline:.0f} % | {r['ttft_s']:.2f} | "
            f"{median(r, 'short_prefill_s'):.2f} | {median(r, 'prefill_s'):.2f} | {rate:.1f} | "
            f"{fmt(peak and 100 * rate / peak, '.0f', ' %')} | {fmt(batch, '.2f')} | "
            f"{fmt(batch and batch / tok_s, '.2f', 'x')} | {r['load_s']:.2f} | "
            f"{r['peak_rss_gb']:.2f} | {r['threads']} |")
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


def decode_tables(title, rows, probe, args):
    """--quant and --model rows as markdown tables: each peer on a GGUF file against that file's
    roofline, then minigemma's speed-up over llama.cpp on each file."""
    lines = [f"{title}; memory probe {probe['gb_s_max']:.1f} GB/s (best reading); each file's "
             f"roofline is that over the tensor bytes stored in it", "",
             f"| peer | GGUF | GB read per token | roofline tok/s | decode tok/s | % roofline | "
             f"first token, {SHORT}-token prompt (s) | {SHORT}-token prefill, warm (s) | engine | "
             f"threads | peak RSS (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r, roofline = row["result"], probe["gb_s_max"] * 1e9 / row["bytes"]
        if r is None:
            continue
        tok_s = median(r, "decode_tok_s")
        lines.append(f"| {row['peer']} | {row['name']} | {row['bytes'] / 1e9:.3f} | "
                     f"{roofline:.2f} | {tok_s:.2f} | {100 * tok_s / roofline:.0f} % | "
                     f"{r['ttft_s']:.2f} | {median(r, 'short_prefill_s'):.3f} | "
                     f"{r.get('engine', 'ggml')} | {r['threads']} | {r['peak_rss_gb']:.2f} |")
    lines += ["", "minigemma's speed-up over llama.cpp on the same file (> 1: minigemma is "
              "faster):", "",
              f"| GGUF | decode (minigemma tok/s / llama.cpp tok/s) | first token | {SHORT}-token "
              f"prefill |", "|---|---|---|---|"]
    for name in dict.fromkeys(row["name"] for row in rows):
        by_peer = {row["peer"]: row["result"] for row in rows if row["name"] == name}
        ours, theirs = by_peer.get("minigemma"), by_peer.get("llama.cpp")
        if ours and theirs:
            decode = speedup(ours, theirs, "decode_tok_s", True)
            lines.append(f"| {name} | {fmt(decode, '.2f', 'x')} | "
                         f"{theirs['ttft_s'] / ours['ttft_s']:.2f}x | "
                         f"{fmt(speedup(ours, theirs, 'short_prefill_s', False), '.2f', 'x')} |")
    lines.append(f"decode: median of {args.reps} x {args.tokens} tokens; first token: load + an "
                 f"{SHORT}-token prompt, once per fresh process. engine: minigemma's `kernels` "
                 f"read the stored blocks (decode.py, decode_gemma3.py, quant_kernels.py); "
                 f"`forward` is Gemma.forward, which dequantizes every matrix for each step.")
    return "\n".join(lines)


def soak_report(result, args, label):
    """The soak's series of resident-memory samples, its growth and a verdict. -> (text, flat)"""
    samples = result["samples"]
    growth = samples[-1][1] - samples[0][1]
    flat = growth < SOAK_FLAT_MB
    lines = [f"soak: {label}; minigemma decoded {args.soak} greedy steps in one process "
             f"({result['engine']} engine, {result['threads']} threads, {result['tok_s']:.2f} "
             f"tok/s)",
             f"KV cache: {result['max_len']} positions, every page written before the first "
             f"sample; when full, its length went back to 0 and the {SHORT}-token prompt was "
             f"prefilled again into the same arrays: {result['restarts']} restart(s)", "",
             "| step | resident memory (MB) |", "|---|---|"]
    lines += [f"| {step} | {mb:.1f} |" for step, mb in samples]
    lines += ["", f"growth: {growth:+.1f} MB (last sample - first; resident memory from "
              f"/proc/self/statm every {SOAK_EVERY} steps)",
              f"verdict: flat (growth under {SOAK_FLAT_MB:.0f} MB)" if flat else
              f"verdict: GROWING (growth of {growth:.1f} MB is over {SOAK_FLAT_MB:.0f} MB)"]
    return "\n".join(lines), flat


def check_options(args):
    """The peers to run and the --quant types, from the arguments; a ValueError naming a bad one."""
    default = ",".join(MODEL_PEERS) if args.model else DEFAULT_PEERS
    peers = [p.strip() for p in (args.peers or default).split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"bench: --peers: unknown peer {unknown[0]!r} "
                         f"(choose from {', '.join(PEERS)})")
    quants = [q.strip() for q in (args.quant or "").split(",") if q.strip()]
    bad = [q for q in quants if q not in QUANT_TYPES]
    if bad:
        raise ValueError(f"bench: --quant: unknown type {bad[0]!r} "
                         f"(choose from {', '.join(QUANT_TYPES)})")
    if args.model and args.model not in MODELS:
        raise ValueError(f"bench: --model: unknown model {args.model!r} "
                         f"(choose from {', '.join(MODELS)})")
    if args.model and (args.checkpoint or quants):
        raise ValueError(f"bench: --model {args.model} measures its own GGUF file: it takes "
                         f"neither --checkpoint nor --quant")
    if args.model and not set(peers) <= set(MODEL_PEERS):
        raise ValueError(f"bench: --model runs {' and '.join(MODEL_PEERS)} (on its GGUF file), "
                         f"not {', '.join(sorted(set(peers) - set(MODEL_PEERS)))}")
    if args.soak is None and ("llama.cpp" in peers or quants) and not args.llama_python:
        raise ValueError("bench: llama.cpp (and --quant, whose files llama.cpp's quantizer makes) "
                         "needs --llama-python, a Python where llama_cpp imports")
    if args.batch < 1:
        raise ValueError(f"bench: --batch must be >= 1, got {args.batch}")
    if args.soak is not None and args.soak < 1:
        raise ValueError(f"bench: --soak must be >= 1 steps, got {args.soak}")
    return peers, quants


def run(args):
    """The benchmark, from the arguments cli.py parsed. -> exit code (1 if a measurement failed,
    or a soak's memory grew)"""
    for name, default in (("batch", 8), ("busy_core", False), ("peers", None), ("quant", None),
                          ("model", None), ("soak", None)):  # options newer than some callers
        setattr(args, name, getattr(args, name, default))
    peers, quants = check_options(args)
    if args.model:
        label = MODELS[args.model]
        ensure_model(args)
    else:
        label = args.checkpoint or f"{args.shape.upper()} shape, bf16 weights"
        ensure_checkpoint(args)
    print(f"machine: {machine()}", flush=True)
    if args.soak is not None:
        result = measure(args, "soak")
        if result is None:
            return 1
        text, flat = soak_report(result, args, label)
        print(text)
        code, raw = 0 if flat else 1, {"soak": result}
    elif args.model:
        code, raw = run_on_ggufs(args, peers, [(args.model, args.gguf)], label)
    else:
        code, raw = run_peers(args, peers, quants, label)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), **raw}, f, indent=1)
    return code


def run_on_ggufs(args, peers, files, title, probes=None):
    """--model (and --quant, after the peer tables): each peer's decode row on each
    (name, GGUF path), a probe before each. -> (exit code, raw measurements)"""
    probes, rows = probes or [], []
    for name, path in files:
        for peer in peers:
            probes.append(measure(args, "probe"))
            rows.append({"peer": peer, "name": name, "file": path, "bytes": gguf_bytes(path),
                         "result": measure_on_gguf(args, peer, path)})
    probes.append(measure(args, "probe"))
    raw = {"probes": probes, "gguf_rows": rows}
    if not any(probes):
        print("bench: every memory probe failed (see above); no table", file=sys.stderr)
        return 1, raw
    probe = max((p for p in probes if p), key=lambda p: p["gb_s_max"])
    print(decode_tables(title, rows, probe, args))
    return (0 if all(row["result"] for row in rows) and all(probes) else 1), raw


def run_peers(args, peers, quants, label):
    """The peer tables on the checkpoint, then the --quant rows. -> (exit code, raw measurements)"""
    if "llama.cpp" in peers or quants:
        ensure_gguf(args)
    quantized = [(kind, ensure_quantized(args, kind)) for kind in quants]
    from .config import from_hf_config

    sgemm = measure(args, "sgemm")
    probes, results = [], {}
    for peer in peers:  # a probe before each peer: other processes come and go
        probes.append(measure(args, "probe"))
        result = measure(args, peer, busy=args.busy_core)
        if result is not None:
            results[peer] = result
            print(f"  {peer}: {json.dumps(result)}", file=sys.stderr, flush=True)
    probes.append(measure(args, "probe"))
    raw = {"probes": probes, "sgemm": sgemm, "results": results}
    if not any(probes):
        print("bench: every memory probe failed (see above); no table", file=sys.stderr)
        return 1, raw
    probe = max((p for p in probes if p), key=lambda p: p["gb_s_max"])
    with open(os.path.join(args.checkpoint, "config.json")) as f:
        gflop = prefill_gflop(from_hf_config(json.load(f)), args.prompt)
    print(tables(results, probe, sgemm, checkpoint_bytes(args.checkpoint), gflop, args, label),
          flush=True)
    code = 0 if len(results) == len(peers) and all(probes) and sgemm else 1
    if quantized:
        print()
        quant_code, raw["quantized"] = run_on_ggufs(
            args, MODEL_PEERS, quantized, f"Quantized GGUFs of {label} (made by llama.cpp's "
            f"quantizer from {os.path.basename(args.gguf)})", probes=[probe])
        code |= quant_code
    return code, raw


if __name__ == "__main__":
    run_worker(sys.argv[1])
