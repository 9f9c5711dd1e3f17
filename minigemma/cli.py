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
Ctrl-C); --debug, accepted by every subcommand, shows the traceback instead. Ctrl-C, pressed any
number of times at any moment, stops cleanly (see Interrupts): the text so far stays printed, a
chat goes on to its next turn, a golden being recorded leaves nothing behind.
"""

import argparse
import itertools
import os
import signal
import sys
import time
import warnings

import numpy as np

from . import bench, builtin, convert, golden, sampling
from .checkpoint import load
from .errors import ContextFullError, GenerationError, MinigemmaError
from .formats.gguf import tokenizer_model_bytes
from .tokenizer import Tokenizer, check_text


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


def add_model_options(parser, precision=True, builtin_default=False):
    """--weights and --tokenizer; with precision, also --dtype and --normalizer. builtin_default:
    --weights may be left out, for the built-in model (builtin.py)."""
    default = " (default: the built-in model, Gemma 3 270M)" if builtin_default else ""
    parser.add_argument("--weights", required=not builtin_default, metavar="PATH",
                        help="checkpoint: a directory (config.json + model.safetensors, or an "
                             "Orbax checkpoint), a gemma_pytorch .ckpt or a .gguf file" + default)
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer.model (default: the one in the checkpoint's directory; "
                             "for a .gguf file without one, the file's own vocabulary)")
    parser.add_argument("--check-weights", action="store_true",
                        help="read every weight once and stop at the first NaN or infinity, "
                             "naming the tensor and index (seconds for 2B)")
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
    except ValueError as e:  # a GenerationError
        fail(e, code=2)
    if args.weights is None:
        args.weights = builtin.builtin_model_path(progress=say)
        say(builtin.DESCRIPTION)
    check_weights_option(args)
    args.tokenizer = args.tokenizer or default_tokenizer(args.weights)
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        fail(f"tokenizer {args.tokenizer} not found (pass --tokenizer PATH)", code=2)
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        say("note: --top-k and --top-p do nothing at temperature 0 (greedy); set --temperature")


def default_tokenizer(weights):
    """tokenizer.model in the checkpoint's directory (beside a checkpoint file); None for a .gguf
    file without one: the file's own vocabulary is the tokenizer then."""
    directory = weights if os.path.isdir(weights) else os.path.dirname(weights)
    path = os.path.join(directory, "tokenizer.model")
    if os.path.isfile(path) or not weights.endswith(".gguf"):
        return path
    return None


def check_weights_option(args):
    if not os.path.exists(args.weights):
        fail(f"--weights {args.weights}: no such file or directory", code=2)


def sampler_from(args):
    return sampling.Sampler(args.temperature, args.top_k, args.top_p, args.seed)


def load_model(args):
    """The model (memory-mapped: loading reads only headers) and its tokenizer, with progress."""
    say(f"loading {args.weights} ...")
    start = time.perf_counter()
    if args.check_weights:
        say("checking every weight for NaN and infinity ...")
    model = load(args.weights, dtype=np.dtype(args.dtype), normalizer=args.normalizer,
                 check_weights=args.check_weights)
    c = model.config
    n_params = sum(w.size for w in model.weights.values())
    n_bytes = sum(w.nbytes for w in model.weights.values())
    stored = sorted({"bfloat16" if w.dtype == np.uint16 else str(w.dtype)
                     for w in model.weights.values()})
    say(f"{count(n_params)} parameters ({count(n_bytes)}B of {'/'.join(stored)}, memory-mapped), "
        f"{c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads / {c.n_kv_heads} kv, "
        f"computing in {model.dtype}, in {time.perf_counter() - start:.2f} s")
    if args.tokenizer is None:
        tokenizer = Tokenizer.from_model_bytes(tokenizer_model_bytes(args.weights), args.weights)
        say(f"tokenizer: the vocabulary in {args.weights}, {tokenizer.vocab_size} pieces")
    else:
        tokenizer = Tokenizer(args.tokenizer)
        say(f"tokenizer {args.tokenizer}: {tokenizer.vocab_size} pieces")
    sampling.check_vocab(model, tokenizer)
    decoder = sampling.decoder_for(model, args.reproducible)
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
    if "prefill_seconds" not in stats:  # stopped during the prefill
        say(f"stopped: {stats.get('stop', 'Ctrl-C')} during the prefill of "
            f"{stats.get('prompt_tokens', '?')} prompt tokens")
        return
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
    add_model_options(parser, builtin_default=True)
    add_decode_options(parser)
    add_sampling_options(parser, max_new_tokens=256)
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user turn in Gemma's chat format (-it models)")
    parser.add_argument("prompt", help="the prompt text (<bos> is prepended)")
    parser.set_defaults(run=run_generate)


def run_generate(args):
    try:
        check_text(args.prompt, "the prompt")
    except GenerationError as e:
        fail(e, code=2)
    if not args.prompt.strip():
        fail("the prompt is empty", code=2)
    check_options(args)
    model, tokenizer = load_model(args)
    if args.chat:
        ids = tokenizer.chat_ids([{"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer.encode(args.prompt)
    stats, code = {}, 0
    try:
        for piece in sampling.stream(model, tokenizer, ids, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, seed=args.seed, stats=stats,
                                     reproducible=args.reproducible):
            write(piece)
    except KeyboardInterrupt:  # the text printed so far stays; the speeds so far follow
        stats["stop"], code = "Ctrl-C", 128 + args.interrupts.signum
    write("\n")
    report(stats)
    return code


# ----------------------------------------------------------------------------------------------
# minigemma chat


def add_chat_parser(subparsers):
    parser = subparsers.add_parser("chat", help="talk to an instruction-tuned (-it) model",
                                   description="One message per line. /reset starts a new "
                                               "conversation; Ctrl-D or Ctrl-C at the prompt "
                                               "quits, Ctrl-C during an answer stops the answer.")
    add_model_options(parser, builtin_default=True)
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
    for line_no in itertools.count(1):
        args.interrupts.arm()  # a new turn: presses during the last one's clean-up are forgotten
        try:
            text = read_message(interactive, line_no).strip()
        except EOFError:
            return 0
        except KeyboardInterrupt:  # at the prompt: quit
            write("\n")
            return 128 + args.interrupts.signum
        except GenerationError as e:  # not UTF-8: this message is skipped, the chat goes on
            say(f"error: {e}")
            continue
        if text == "/reset":
            chat.reset()
            say("conversation reset")
        elif text:
            answer(chat, text)


def read_message(interactive, line_no):
    """The next line the user typed, or EOFError at the end of the input."""
    if interactive:
        try:
            return input("> ")
        except UnicodeDecodeError as e:
            raise GenerationError(f"that message is not valid UTF-8 text ({e.reason} at byte "
                                  f"{e.start}); it was skipped") from None
    raw = sys.stdin.buffer.readline()
    if not raw:
        raise EOFError
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GenerationError(f"line {line_no} of the input is not valid UTF-8 text (byte "
                              f"0x{raw[e.start]:02x} at byte {e.start}); it was skipped") from None


def answer(chat, text):
    """Stream the model's answer to one message; Ctrl-C stops the answer, not the session."""
    try:
        for piece in chat.reply(text):
            write(piece)
    except KeyboardInterrupt:  # the conversation keeps what was printed (see sampling.Chat)
        say("(answer interrupted)")
    except ContextFullError as e:
        say(f"error: {e}; /reset starts a new conversation")
    except GenerationError as e:  # e.g. text that is not UTF-8
        say(f"error: {e}")
    write("\n")


def unsafe_to_stop(frame):
    """Whether a KeyboardInterrupt raised in `frame` could do harm beyond stopping the run:
    - in numba's (or llvmlite's) own Python code, compiling or loading a kernel or converting its
      arguments: it could come back as a SystemError and leave numba broken, so that a later
      call crashes;
    - in code exec'd or eval'd from a string (dataclasses and namedtuples make their methods so):
      CPython notes a KeyboardInterrupt leaving such code as unhandled (run_eval_code_obj in
      Python/pythonrun.c), and ends the process by SIGINT at exit even when it was caught;
    - in the import system, which would leave the module half imported."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(("<string>", "<frozen importlib")) or \
                frame.f_globals.get("__name__", "").startswith(("numba", "llvmlite")):
            return True
        frame = frame.f_back
    return False


class Interrupts:
    """Ctrl-C (SIGINT), and SIGTERM where `catch` asks, for the whole run of a command.

    Python runs a signal handler between two bytecodes of the main thread, so a handler that
    raises KeyboardInterrupt raises it in whatever Python code was running. In minigemma's code
    and NumPy's that is safe: each NumPy call has finished or not begun, and what is kept stays
    consistent (a KV cache's length moves only after a step completes; goldens and conversions
    are written to a temporary path). Elsewhere it may not be (unsafe_to_stop). So:

    - a press raises KeyboardInterrupt at once where that is safe; elsewhere it is held, and
      looked at again every RETRY seconds (SIGALRM) until the running code is safe to stop, at
      most a few milliseconds later (numba's first compile of the kernels, seconds once per
      installation, runs to its end);
    - one press raises once: the handler disarms itself, so that more presses during the clean-up
      (printing the text so far, removing a temporary golden) are ignored until arm() (the chat
      arms it again for each turn).

    On the way out the handlers are restored, or SIGINT is left ignored (ignore_at_exit: the
    program is ending, and the interpreter would otherwise die of a late press with no exit code).
    """

    RETRY = 0.005  # seconds

    def __init__(self, ignore_at_exit=False):
        self.ignore_at_exit = ignore_at_exit
        self.armed, self.pending, self.signum = True, False, signal.SIGINT
        self.previous = {}

    def __enter__(self):
        self.catch(signal.SIGINT)
        self.previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self.retry)
        return self

    def catch(self, signum):
        self.previous.setdefault(signum, signal.signal(signum, self.handle))

    def handle(self, signum, frame):
        self.signum = signum
        if self.armed:
            self.pending = True
            self.retry(signum, frame)

    def retry(self, signum, frame):
        """Raise the KeyboardInterrupt of a held press if `frame` is safe to stop, or look again
        in RETRY seconds."""
        if not (self.pending and self.armed):
            return
        if unsafe_to_stop(frame):
            signal.setitimer(signal.ITIMER_REAL, self.RETRY)
            return
        self.armed = self.pending = False
        raise KeyboardInterrupt

    def arm(self):
        self.armed, self.pending = True, False

    def __exit__(self, *exc_info):
        self.armed = False  # a retry already due finds nothing to raise
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, previous in self.previous.items():
            ignore = self.ignore_at_exit and signum == signal.SIGINT
            signal.signal(signum, signal.SIG_IGN if ignore else previous)


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
    # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so the temporary directory is removed.
    args.interrupts.catch(signal.SIGTERM)

    say(f"recording {args.out} from {args.weights} ...")
    if args.check_weights:
        say(f"checking every weight of {args.weights} for NaN and infinity ...")
        load(args.weights, check_weights=True)
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
    if args.check_weights:
        say(f"checking every weight of {args.weights} for NaN and infinity ...")
        load(args.weights, check_weights=True)
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
    parser.add_argument("--batch", type=int, default=8,
                        help="sequences decoded together in the batch row (default 8)")
    parser.add_argument("--busy-core", action="store_true",
                        help="keep one core busy with a spinning process while each peer runs")
    parser.add_argument("--peers",
                        help=f"comma-separated, from {', '.join(bench.PEERS)} (default "
                             f"{bench.DEFAULT_PEERS}; with --model: {','.join(bench.MODEL_PEERS)})")
    parser.add_argument("--llama-python", help="a Python where llama_cpp imports (opt-in peer)")
    parser.add_argument("--gguf", help="bf16 GGUF of the checkpoint (CHECKPOINT-bf16.gguf)")
    parser.add_argument("--gguf-converter", help="llama.cpp's convert_hf_to_gguf.py (makes --gguf)")
    parser.add_argument("--quant", metavar="TYPES",
                        help=f"also minigemma and llama.cpp on GGUFs of the checkpoint quantized "
                             f"by llama.cpp's quantizer (made once, beside --gguf; needs "
                             f"--llama-python): comma-separated, from "
                             f"{', '.join(bench.QUANT_TYPES)}")
    parser.add_argument("--model", choices=sorted(bench.MODELS),
                        help="decode and first token of minigemma and llama.cpp on this real "
                             "model instead: gemma3-270m is the built-in Gemma 3 270M Q4_K_M GGUF")
    parser.add_argument("--soak", type=int, nargs="?", const=bench.SOAK_STEPS, metavar="N",
                        help=f"only a soak: minigemma decodes N greedy steps (default "
                             f"{bench.SOAK_STEPS}) in one process, resident memory sampled every "
                             f"{bench.SOAK_EVERY} steps; exit 1 if it grows")
    parser.add_argument("--json", help="also write the raw measurements to this file")
    parser.set_defaults(run=run_bench)


def run_bench(args):
    for name in ("tokens", "prompt", "reps", "prefill_reps", "batch"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", code=2)
    if args.soak is not None and args.soak < 1:
        fail(f"--soak must be >= 1 steps, got {args.soak}", code=2)
    return bench.run(args)


# ----------------------------------------------------------------------------------------------
# minigemma convert


def add_convert_parser(subparsers):
    parser = subparsers.add_parser(
        "convert", help="write a checkpoint as a Hugging Face directory or a GGUF file",
        description="Convert a checkpoint minigemma reads (Hugging Face directory, gemma_pytorch "
                    ".ckpt, GGUF, Orbax) to a Hugging Face directory or a GGUF file: tensors bit "
                    "for bit where the formats allow, quantized ones as their float32 values. "
                    "Written all or nothing; progress on stderr.")
    parser.add_argument("src", metavar="SRC", help="the checkpoint to read")
    parser.add_argument("dst", metavar="DST",
                        help="the directory (Hugging Face layout) or .gguf file to create")
    parser.add_argument("--to", choices=convert.FORMATS,
                        help="destination format (default: gguf for a .gguf name, else hf)")
    parser.add_argument("--outtype", choices=convert.OUTTYPES,
                        help="GGUF only: store every matrix as this type (default: as stored; "
                             "quantized weights as f32)")
    parser.add_argument("--config", metavar="CONFIG",
                        help="config.json (needed for a .ckpt whose shapes match no preset)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer.model (default: the one beside SRC, or a GGUF's own "
                             "vocabulary)")
    parser.add_argument("--force", action="store_true", help="replace an existing DST")
    parser.set_defaults(run=run_convert)


def run_convert(args):
    try:
        to = convert.destination_format(args.dst, args.to)
    except ValueError as e:
        fail(e, code=2)
    if args.outtype and to != "gguf":
        fail(f"--outtype applies to a GGUF destination; {args.dst} is written as a Hugging Face "
             f"directory, every tensor in its stored type", code=2)
    # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so the temporary output is removed.
    args.interrupts.catch(signal.SIGTERM)
    convert.convert(args.src, args.dst, to=to, outtype=args.outtype, config=args.config,
                    tokenizer=args.tokenizer, progress=say, force=args.force)
    return 0


# ----------------------------------------------------------------------------------------------
# Entry point

SUBCOMMANDS = [add_generate_parser, add_chat_parser, add_golden_parser, add_bench_parser,
               add_convert_parser]


def build_parser():
    parser = Parser(prog="minigemma", description="Gemma 1 in plain NumPy.")
    parser.set_defaults(interrupts=Interrupts())  # main() replaces it with the one installed
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def show_warning(message, category, filename, lineno, file=None, line=None):
    say(f"warning: {message}")


def main(argv=None):
    """Run the command line; argv None means sys.argv, as the program itself."""
    args = None
    interrupts = Interrupts(ignore_at_exit=argv is None)
    # The KeyboardInterrupt is caught outside the `with`: a press held a few milliseconds
    # (Interrupts.retry) may come due just as the run returns, on its way out.
    try:
        with interrupts:
            try:
                args = build_parser().parse_args(argv)
                args.interrupts = interrupts
                warnings.showwarning = show_warning
                # NumPy's overflow warnings would only repeat, less clearly, what the model's own
                # check says: which layer first held a NaN or an infinity (non_finite_error).
                with np.errstate(all="ignore"):
                    return args.run(args)
            except BrokenPipeError:  # the reader went away (`| head`): stop quietly
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 1
            # MinigemmaError, and the ValueError / OSError (FileNotFoundError) of other libraries
            except (MinigemmaError, ValueError, OSError) as e:
                if getattr(args, "debug", False):
                    raise
                fail(e)
    except KeyboardInterrupt:  # raised by Interrupts, where it is safe: the run stops here
        write("\n")
        say("interrupted")
        return 128 + interrupts.signum
