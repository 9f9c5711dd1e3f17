"""`minigemma bench`: decode and prefill speed on the true 2B (or 7B) shape, beside its peers.

    minigemma bench [--shape 2b] [--tokens 32] [--prompt 512] [--reps 3]
                    [--peers minigemma,hf-bf16,hf-f32] [--llama-python PY --gguf-converter SCRIPT]

All peers run the same seeded random bfloat16 checkpoint (scripts/make_2b_shape_checkpoint.py,
generated on first use). Each measurement runs in its own subprocess, so memory peaks do not add
up and each peak RSS is that peer's own, and every worker takes /tmp/minigemma-2b.lock while it
holds the weights, so no two full-size models are in memory at once.

What is measured, per peer (median of --reps repetitions):
    decode    tok/s over --tokens greedy steps after an 8-token prompt, and from it the effective
              read bandwidth (checkpoint bytes per token x tok/s) and the % of the roofline;
    roofline  a memory-bandwidth probe (numba, all threads, sums a 1 GB array), run before each
              peer and at the end; its best reading divided by the bytes one decoded token must
              read (every weight, once);
    prefill   seconds for one forward pass over a --prompt-token prompt (logits of the last token);
    load      seconds from load() to a ready model; time to first token = load + the first forward
              over the 8-token prompt in a fresh process (first touch of the mapped weights
              included); numba's compile / cache-load time, measured before, has its own line.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

LOCK = "/tmp/minigemma-2b.lock"
PEERS = ("minigemma", "minigemma-exact", "hf-bf16", "hf-f32", "llama.cpp")
DEFAULT_PEERS = "minigemma,hf-bf16,hf-f32"
SHORT_PROMPT = [2, 651, 6037, 576, 573, 2134, 603, 235248]  # 8 token ids, <bos> first
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


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
    import numpy as np

    import minigemma
    from minigemma import kernels
    compile_s, _ = timed((kernels.EXACT if reproducible else kernels.FAST).warm_up)
    load_s, model = timed(lambda: minigemma.load(args.checkpoint, reproducible=reproducible))
    c = model.config
    cache = model.new_cache(len(SHORT_PROMPT) + args.tokens * args.reps + 1)
    first_s, logits = timed(lambda: model.forward(SHORT_PROMPT, cache, last_only=True))

    decode = []
    for _ in range(args.reps):
        token = int(np.argmax(logits[0]))
        start = time.perf_counter()
        for _ in range(args.tokens):
            logits = model.forward([token], cache)
            token = int(np.argmax(logits[0]))
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
        first_s, (logits, past) = timed(lambda: step(SHORT_PROMPT, None))
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
    n_ctx = args.prompt + len(SHORT_PROMPT) + args.tokens * args.reps
    load_s, llm = timed(lambda: llama_cpp.Llama(args.gguf, n_ctx=n_ctx, n_batch=args.prompt,
                                                n_threads=threads, n_threads_batch=threads,
                                                verbose=False))

    first_s, _ = timed(lambda: llm.eval(SHORT_PROMPT))
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


def run_worker(args):
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
    """The random checkpoint of --shape: generated by scripts/make_2b_shape_checkpoint.py."""
    script = os.path.join(REPO, "scripts", "make_2b_shape_checkpoint.py")
    if args.checkpoint is None:
        if not os.path.exists(script):
            raise ValueError(f"bench: {script} not found (run from a source checkout) and no "
                             f"--checkpoint given")
        sys.path.insert(0, os.path.dirname(script))
        from make_2b_shape_checkpoint import default_dir
        args.checkpoint = default_dir(args.shape)
    if os.path.exists(script):
        subprocess.run(["flock", LOCK, sys.executable, script, args.checkpoint,
                        "--shape", args.shape], check=True)
    elif not os.path.isdir(args.checkpoint):
        raise ValueError(f"bench: --checkpoint {args.checkpoint}: not a directory")


def ensure_gguf(args):
    """A bfloat16 GGUF of the checkpoint, converted once by llama.cpp's convert_hf_to_gguf.py."""
    args.gguf = args.gguf or args.checkpoint.rstrip("/") + "-bf16.gguf"
    if os.path.exists(args.gguf):
        return
    if not args.gguf_converter:
        raise ValueError("bench: llama.cpp needs --gguf FILE or --gguf-converter "
                         "path/to/convert_hf_to_gguf.py (in the llama-cpp-python source package)")
    # The checkpoint's tokenizer.model (the tiny one padded to 256000 pieces) satisfies the converter.
    subprocess.run(["flock", LOCK, sys.executable, args.gguf_converter, args.checkpoint,
                    "--outtype", "bf16", "--outfile", args.gguf + ".partial"], check=True)
    os.replace(args.gguf + ".partial", args.gguf)


def measure(args, worker, python=None):
    """Run one worker in a fresh process (holding the full-size lock); its JSON result."""
    # -I: minigemma/ itself stays off sys.path (its safetensors.py would shadow the package)
    command = ["flock", LOCK, python or sys.executable, "-I", os.path.abspath(__file__),
               "--worker", worker, "--checkpoint", args.checkpoint, "--tokens", str(args.tokens),
               "--prompt", str(args.prompt), "--reps", str(args.reps),
               "--prefill-reps", str(args.prefill_reps)]
    if args.gguf:
        command += ["--gguf", args.gguf]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print(f"  measuring {worker} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  {worker} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkpoint_bytes(directory):
    """Bytes one decoded token reads: every weight of the checkpoint once (lm_head is tied)."""
    sys.path.insert(0, os.path.abspath(REPO))
    from minigemma.formats import safetensors
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


def table(results, probe, bytes_per_token, args):
    """The results as a markdown table, minigemma's ratio to each peer in the last columns."""
    med = statistics.median
    roofline = probe["gb_s_max"] * 1e9 / bytes_per_token
    ours = results.get("minigemma")
    lines = [f"{args.shape.upper()} shape, bf16 weights ({bytes_per_token / 1e9:.2f} GB read per "
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
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"bench: --peers: unknown peer {unknown[0]!r} "
                         f"(choose from {', '.join(PEERS)})")
    if "llama.cpp" in peers and not args.llama_python:
        raise ValueError("bench: llama.cpp needs --llama-python, a Python where llama_cpp imports")
    ensure_checkpoint(args)
    if "llama.cpp" in peers:
        ensure_gguf(args)
    print(f"machine: {machine()}", flush=True)
    probes, results = [], {}
    for peer in peers:  # a probe before each peer: other processes come and go
        probes.append(measure(args, "probe"))
        result = measure(args, peer, python=args.llama_python if peer == "llama.cpp" else None)
        if result is not None:
            results[peer] = result
            print(f"  {peer}: {json.dumps(result)}", file=sys.stderr, flush=True)
    probes.append(measure(args, "probe"))
    probe = max((p for p in probes if p), key=lambda p: p["gb_s_max"])
    report = table(results, probe, checkpoint_bytes(args.checkpoint), args)
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "probes": probes, "results": results}, f, indent=1)
    return 0


def add_arguments(parser):
    parser.add_argument("--shape", choices=["2b", "7b"], default="2b",
                        help="model shape (7b needs ~17 GB for bf16 weights, ~40 GB for hf-f32)")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: the generated "
                        "random one, ~/.cache/minigemma/gemma-SHAPE-shape)")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens per repetition")
    parser.add_argument("--prompt", type=int, default=512, help="prefill prompt length")
    parser.add_argument("--reps", type=int, default=3, help="decode repetitions (median)")
    parser.add_argument("--prefill-reps", type=int, default=3, help="prefill repetitions (median)")
    parser.add_argument("--peers", default=DEFAULT_PEERS,
                        help=f"comma-separated, from {', '.join(PEERS)} (default {DEFAULT_PEERS})")
    parser.add_argument("--llama-python", help="a Python where llama_cpp imports (opt-in peer)")
    parser.add_argument("--gguf", help="bf16 GGUF of the checkpoint (CHECKPOINT-bf16.gguf)")
    parser.add_argument("--gguf-converter", help="llama.cpp's convert_hf_to_gguf.py (makes --gguf)")
    parser.add_argument("--json", help="also write the raw measurements to this file")


def add_parser(subparsers):
    """Register `minigemma bench` on the CLI's subparsers."""
    parser = subparsers.add_parser("bench", help="decode/prefill speed against transformers "
                                   "(and llama.cpp) on the 2B-shape checkpoint",
                                   description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(run=run)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="minigemma bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--worker", choices=("probe",) + PEERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, os.path.abspath(REPO))  # the directory that holds the package
        run_worker(args)
        return 0
    try:
        return run(args)
    except ValueError as e:
        sys.exit(f"minigemma {e}")


if __name__ == "__main__":
    sys.exit(main())
