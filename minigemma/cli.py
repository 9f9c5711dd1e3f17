"""The `minigemma` command (also `python -m minigemma`). Every option of every subcommand is
declared and checked here; the library functions it calls trust their arguments.

    minigemma generate --weights DIR "prompt"    stream the continuation of a prompt
    minigemma generate --weights DIR --chat "…"  the prompt as a user turn of an -it model
    minigemma chat --weights DIR                 talk to an -it model; one KV cache for all turns
    minigemma golden record|check|diff ...       golden outputs (golden.py, divergence.py)
    minigemma bench ...                          speed beside transformers and llama.cpp (bench.py)

Each subcommand has a function `add_..._parser(subparsers)` that declares its options and sets
`run`: a function of the parsed arguments that returns the exit code. SUBCOMMANDS lists them.
Errors print as one line, `minigemma: error: ...`, and exit with 1 (2 for bad arguments, 130 on
Ctrl-C); --debug, accepted by every subcommand, shows the traceback instead.
"""

import argparse
import os
import signal
import sys
import time
import warnings

import numpy as np

from . import bench, golden, sampling
from .checkpoint import load
from .decode import Decoder
from .tokenizer import Tokenizer


def say(line):
    """Progress and statistics go to stderr, so stdout carries only the model's text."""
    print(f"minigemma: {line}", file=sys.stderr, flush=True)


def fail(message, code=1):
    print(f"minigemma: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def write(text):
    """Print model text as soon as it exists."""
    sys.stdout.write(text)
    sys.stdout.flush()


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and a --debug flag on every command and subcommand."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SUPPRESS: left unset unless given, so a subcommand cannot undo `minigemma --debug ...`.
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an error")

    def error(self, message):
        fail(f"{message} (see: {self.prog} --help)", code=2)


# ----------------------------------------------------------------------------------------------
# Options shared by the subcommands, checked before anything loads


def add_model_options(parser, precision=True):
    """--weights and --tokenizer; with precision, also --dtype and --normalizer."""
    parser.add_argument("--weights", required=True, metavar="DIR",
                        help="checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer.model (default: DIR/tokenizer.model)")
    if precision:
        parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                            help="compute dtype (default float32; float64 is a slower reference)")
        parser.add_argument("--normalizer", choices=["exact", "bf16"], default="exact",
                            help="sqrt(d_model) embedding scale: float32 as transformers (exact) "
                                 "or rounded to bfloat16 as the official JAX code (bf16)")


def add_decode_options(parser):
    parser.add_argument("--reproducible", action="store_true",
                        help="decode with the bitwise-exact kernels: with --seed, the same text "
                             "on every machine and thread count (slower)")


def add_sampling_options(parser, max_new_tokens):
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                        help=f"stop after N new tokens (default {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) is greedy; higher is more random")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help="sample only from the K most likely tokens")
    parser.add_argument("--top-p", type=float, metavar="P",
                        help="sample only from the most likely tokens holding P of the mass "
                             "(after --top-k, as transformers does)")
    parser.add_argument("--seed", type=int,
                        help="seed for sampling: the same seed gives the same text (on every "
                             "machine with --reproducible)")


def check_options(args):
    """Reject bad generate/chat arguments before loading gigabytes; fill in the tokenizer path."""
    try:
        sampling.check_sampling(args.temperature, args.top_k, args.top_p, args.seed)
        sampling.check_max_new_tokens(args.max_new_tokens)
    except ValueError as e:
        fail(e, code=2)
    check_weights_option(args)
    args.tokenizer = args.tokenizer or os.path.join(args.weights, "tokenizer.model")
    if not os.path.isfile(args.tokenizer):
        fail(f"tokenizer {args.tokenizer} not found (pass --tokenizer PATH)", code=2)
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        say("note: --top-k and --top-p do nothing at temperature 0 (greedy); set --temperature")


def check_weights_option(args):
    if not os.path.exists(args.weights):
        fail(f"--weights {args.weights}: no such file or directory", code=2)


def sampler_from(args):
    return sampling.Sampler(args.temperature, args.top_k, args.top_p, args.seed)


def load_model(args):
    """The model (memory-mapped: loading reads only headers) and its tokenizer, with progress."""
    say(f"loading {args.weights} ...")
    start = time.perf_counter()
    model = load(args.weights, dtype=np.dtype(args.dtype), normalizer=args.normalizer)
    c = model.config
    n_params = sum(w.size for w in model.weights.values())
    n_bytes = sum(w.nbytes for w in model.weights.values())
    stored = sorted({"bfloat16" if w.dtype == np.uint16 else str(w.dtype)
                     for w in model.weights.values()})
    say(f"{count(n_params)} parameters ({count(n_bytes)}B of {'/'.join(stored)}, memory-mapped), "
        f"{c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads / {c.n_kv_heads} kv, "
        f"computing in {model.dtype}, in {time.perf_counter() - start:.2f} s")
    tokenizer = Tokenizer(args.tokenizer)
    say(f"tokenizer {args.tokenizer}: {tokenizer.vocab_size} pieces")
    sampling.check_vocab(model, tokenizer)
    decoder = Decoder(model, args.reproducible)
    if decoder.on_kernels:  # so that compiling is never counted in the decode speed
        start = time.perf_counter()
        decoder.warm_up()
        say(f"numba decode kernels ready in {time.perf_counter() - start:.2f} s "
            f"(compiled on the first run, then loaded from numba's cache)")
    return model, tokenizer


def count(n):
    """2506172416 -> '2.51G'; 131072 -> '131.1K'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "G" else f"{n / size:.1f}{unit}"
    return str(n)


def report(stats):
    """Speeds on stderr: prompt tokens count for prefill only, never as generated tokens."""
    prefill, decode = stats["prefill_seconds"], stats["decode_seconds"]
    first = stats.get("first_token_seconds", prefill)
    say(f"prefill: {stats['prompt_tokens']} prompt tokens in {prefill:.3f} s "
        f"({stats['prompt_tokens'] / prefill:.1f} tok/s); first token after {first:.3f} s")
    rate = f" ({stats['decode_steps'] / decode:.1f} tok/s)" if decode > 0 else ""
    say(f"decode: {stats['new_tokens']} new tokens, {stats['decode_steps']} decode steps in "
        f"{decode:.3f} s{rate}; stopped: {stats['stop']}")


# ----------------------------------------------------------------------------------------------
# minigemma generate


def add_generate_parser(subparsers):
    parser = subparsers.add_parser("generate", help="stream the continuation of a prompt",
                                   description="Stream the text that follows PROMPT; speeds go "
                                               "to stderr at the end.")
    add_model_options(parser)
    add_decode_options(parser)
    add_sampling_options(parser, max_new_tokens=256)
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user turn in Gemma's chat format (-it models)")
    parser.add_argument("prompt", help="the prompt text (<bos> is prepended)")
    parser.set_defaults(run=run_generate)


def run_generate(args):
    if not args.prompt.strip():
        fail("the prompt is empty", code=2)
    check_options(args)
    model, tokenizer = load_model(args)
    if args.chat:
        ids = tokenizer.chat_ids([{"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer.encode(args.prompt)
    stats = {}
    with CtrlC() as ctrl_c:
        for piece in sampling.stream(model, tokenizer, ids, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, seed=args.seed, stats=stats,
                                     reproducible=args.reproducible):
            write(piece)
            if ctrl_c.pressed:
                stats["stop"] = "Ctrl-C"
                break
    write("\n")
    report(stats)
    return 130 if ctrl_c.pressed else 0


# ----------------------------------------------------------------------------------------------
# minigemma chat


def add_chat_parser(subparsers):
    parser = subparsers.add_parser("chat", help="talk to an instruction-tuned (-it) model",
                                   description="One message per line. /reset starts a new "
                                               "conversation; Ctrl-D or Ctrl-C at the prompt "
                                               "quits, Ctrl-C during an answer stops the answer.")
    add_model_options(parser)
    add_decode_options(parser)
    add_sampling_options(parser, max_new_tokens=1024)
    parser.set_defaults(run=run_chat)


def run_chat(args):
    check_options(args)
    model, tokenizer = load_model(args)
    chat = sampling.Chat(model, tokenizer, sampler_from(args), max_new_tokens=args.max_new_tokens,
                         reproducible=args.reproducible)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
        say("one message per line; /reset starts over; Ctrl-D or Ctrl-C quits")
    while True:
        try:
            text = input("> " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                write("\n")
            return 0
        if text == "/reset":
            chat.reset()
            say("conversation reset")
        elif text:
            answer(chat, text)


def answer(chat, text):
    """Stream the model's answer to one message; Ctrl-C stops the answer, not the session."""
    try:
        with CtrlC() as ctrl_c:
            for piece in chat.reply(text):
                write(piece)
                if ctrl_c.pressed:
                    say("(answer interrupted)")
                    break
    except ValueError as e:  # the conversation no longer fits the context
        say(f"error: {e}; /reset starts a new conversation")
    write("\n")


class CtrlC:
    """Ctrl-C during generation, as a flag the caller reads between pieces of text.

    A KeyboardInterrupt raised inside a numba kernel can leave numba's thread pool broken (a later
    call may crash), so the first Ctrl-C only asks generation to stop after the current token. A
    second one interrupts at once, and the program exits.
    """

    def __enter__(self):
        self.pressed = False
        self.previous = signal.signal(signal.SIGINT, self.press)
        return self

    def press(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc_info):
        signal.signal(signal.SIGINT, self.previous)


# ----------------------------------------------------------------------------------------------
# minigemma golden record | check | diff


def add_golden_parser(subparsers):
    parser = subparsers.add_parser("golden", help="record, check and compare golden outputs")
    commands = parser.add_subparsers(dest="golden_command", required=True, metavar="COMMAND")

    rec = commands.add_parser("record", help="run prompts through minigemma, write a golden")
    add_model_options(rec)
    rec.add_argument("--prompts", required=True, help="prompts .jsonl (name + text|chat|ids)")
    rec.add_argument("--out", required=True, help="golden directory to create")
    rec.add_argument("--activations", nargs="*", metavar="PROMPT",
                     help="also store every named activation, for the named prompts or (no names) "
                          "every prompt whose logits are stored in full")
    rec.add_argument("--new-tokens", type=int, default=golden.NEW_TOKENS,
                     help="greedy tokens to record")
    rec.add_argument("--full-logits-max-tokens", type=int, default=golden.FULL_LOGITS_MAX_TOKENS,
                     help="longer prompts store last-row logits + top-k per position")
    rec.add_argument("--top-k", type=int, default=golden.TOP_K)
    rec.add_argument("--atol", type=float, default=golden.ATOL, help="recommended logits atol")
    rec.add_argument("--rtol", type=float, default=golden.RTOL, help="recommended logits rtol")
    rec.add_argument("--activation-tol", type=float, default=golden.ACTIVATION_TOL,
                     help="recommended max |error| / max |golden| per activation point")
    rec.add_argument("--force", action="store_true", help="replace an existing golden")
    rec.set_defaults(run=run_golden_record)

    chk = commands.add_parser("check", help="re-compute a golden with minigemma and compare")
    chk.add_argument("golden", help="golden directory")
    add_model_options(chk, precision=False)  # the precision recipe is the golden's
    chk.add_argument("--atol", type=float, help="default: the golden's recorded tolerance")
    chk.add_argument("--rtol", type=float, help="default: the golden's recorded tolerance")
    chk.set_defaults(run=run_golden_check)

    dif = commands.add_parser("diff", help="find where another implementation's activations "
                                           "diverge from a golden recorded with --activations")
    dif.add_argument("golden", help="golden directory")
    dif.add_argument("other", help=".npz of activations named '<prompt>/<point>'")
    dif.add_argument("--prompt", help="only this prompt")
    dif.add_argument("--tol", type=float, help="max |error| / max |golden| allowed at a point "
                                               "(default: the golden's activation_rel)")
    dif.set_defaults(run=run_golden_diff)


def run_golden_record(args):
    check_weights_option(args)
    # SIGTERM (e.g. a CI timeout) should unwind like Ctrl-C, so the temporary directory is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # --activations alone: every full-logits prompt; with names: those prompts; absent: none
    activations = True if args.activations == [] else (args.activations or False)
    golden.record(args.weights, args.prompts, args.out, tokenizer=args.tokenizer,
                  activations=activations, new_tokens=args.new_tokens, dtype=np.dtype(args.dtype),
                  normalizer=args.normalizer, full_logits_max_tokens=args.full_logits_max_tokens,
                  top_k=args.top_k, atol=args.atol, rtol=args.rtol,
                  activation_tol=args.activation_tol, overwrite=args.force, progress=say)
    say(f"wrote {args.out}/golden.json and golden.npz")
    return 0


def run_golden_check(args):
    check_weights_option(args)
    result = golden.check(args.golden, args.weights, atol=args.atol, rtol=args.rtol, progress=say)
    print(result)
    return 0 if result.passed else 1


def run_golden_diff(args):
    result = golden.diff(golden.load(args.golden), args.other, prompt=args.prompt, tol=args.tol)
    print(result)
    return 0 if result.first is None else 1


# ----------------------------------------------------------------------------------------------
# minigemma bench


def add_bench_parser(subparsers):
    parser = subparsers.add_parser("bench", help="decode/prefill speed against transformers "
                                   "(and llama.cpp) on the 2B-shape checkpoint",
                                   description=bench.__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["2b", "7b"], default="2b",
                        help="model shape (7b needs ~17 GB for bf16 weights, ~40 GB for hf-f32)")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: the generated "
                        "random one, in minigemma's cache directory)")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens per repetition")
    parser.add_argument("--prompt", type=int, default=512, help="prefill prompt length")
    parser.add_argument("--reps", type=int, default=3, help="decode repetitions (median)")
    parser.add_argument("--prefill-reps", type=int, default=3, help="prefill repetitions (median)")
    parser.add_argument("--peers", default=bench.DEFAULT_PEERS,
                        help=f"comma-separated, from {', '.join(bench.PEERS)} "
                             f"(default {bench.DEFAULT_PEERS})")
    parser.add_argument("--llama-python", help="a Python where llama_cpp imports (opt-in peer)")
    parser.add_argument("--gguf", help="bf16 GGUF of the checkpoint (CHECKPOINT-bf16.gguf)")
    parser.add_argument("--gguf-converter", help="llama.cpp's convert_hf_to_gguf.py (makes --gguf)")
    parser.add_argument("--json", help="also write the raw measurements to this file")
    parser.set_defaults(run=run_bench)


def run_bench(args):
    for name in ("tokens", "prompt", "reps", "prefill_reps"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", code=2)
    return bench.run(args)


# ----------------------------------------------------------------------------------------------
# Entry point

SUBCOMMANDS = [add_generate_parser, add_chat_parser, add_golden_parser, add_bench_parser]


def build_parser():
    parser = Parser(prog="minigemma", description="Gemma 1 in plain NumPy.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def is_ctrl_c(error):
    """Whether an exception is Ctrl-C. Raised inside a numba kernel call, the KeyboardInterrupt can
    surface as a SystemError caused by it."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


def show_warning(message, category, filename, lineno, file=None, line=None):
    say(f"warning: {message}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    warnings.showwarning = show_warning
    try:
        return args.run(args)
    except (KeyboardInterrupt, SystemError) as e:
        if not is_ctrl_c(e):
            raise
        write("\n")
        say("interrupted")
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        if getattr(args, "debug", False):
            raise
        fail(e)
