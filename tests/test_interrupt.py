"""Ctrl-C pressed any number of times, at any moment, stops the command line cleanly.

Each trial runs `python -m minigemma` and sends SIGINT one to eight times at random moments after
it starts work (loading, compiling or loading the numba kernels, prefill, decode, between chat
turns, writing a golden), some presses milliseconds apart. Whatever the moment, the run must end
with exit code 0 (every press came after the work, or was absorbed by a stop already under way)
or 130, with no traceback and no crash, and:

- generate: the text printed is the start of the uninterrupted text;
- chat: fed "Hello there", "Tell me more", "/reset", "Hello there" at once, a chat that is not
  quit by a press at its prompt goes on after an interrupted answer, and its last answer is the
  uninterrupted first answer again;
- golden record --force over an existing golden: that directory holds the previous golden or the
  new one, complete (checksums verified), and nothing else is left beside it;
- convert --force over an existing Hugging Face directory or .gguf file: likewise, the previous
  checkpoint or the new one, complete, and nothing else beside it.

The model is a random float32 Gemma 1 large enough (16 MB, 4 layers) for the presses to land
inside the numba decode kernels as well as between them. TRIALS run in the normal suite, and
under `-m slow` SLOW_TRIALS of each command (250 in all: more of the quick ones). The assertions accept every legitimate outcome, so none
races the clock.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import safetensors.numpy

import minigemma
from minigemma import golden
from minigemma.checkpoint import expected_shapes
from minigemma.config import GemmaConfig

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TOKENIZER = os.path.join(ROOT, "examples", "tiny-gemma", "tokenizer.model")
TRIALS = 2
SLOW_TRIALS = {"generate": 100, "chat": 25, "golden record": 25, "convert": 100}
CONFIG = GemmaConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=1,
                     head_dim=64, ffn_dim=1024, max_positions=1024)
CHAT_INPUT = b"Hello there\nTell me more\n/reset\nHello there\n"
BAD = ("Traceback", "Error", "Fatal", "Segmentation", "core dumped")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The random checkpoint, with the tiny tokenizer, written by the safetensors package."""
    out = tmp_path_factory.mktemp("medium")
    rng = np.random.default_rng(0)
    # Projections 4x the usual scale: the layers, not the tied embedding, choose the next token,
    # so greedy text varies instead of repeating one token (which would make a weak check).
    tensors = {name: (rng.standard_normal(shape) * (0.5 if len(shape) == 1 else
                                                    0.3 if "embed" in name else
                                                    4 * shape[1] ** -0.5)
                      ).astype(np.float32) for name, shape in expected_shapes(CONFIG).items()}
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "gemma", "vocab_size": 512, "hidden_size": 256,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
              "head_dim": 64, "intermediate_size": 1024, "max_position_embeddings": 1024}
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(TOKENIZER, out / "tokenizer.model")
    return str(out)


def run(args, stdin=b"", presses=()):
    """Run the CLI; `presses` are delays (s) after its first line on stderr (its work has begun:
    Python and minigemma are imported) at which to send SIGINT. -> (exit code, stdout, stderr,
    seconds from the first line to the end)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "NUMBA_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "minigemma", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    out, err, started = [], [], threading.Event()

    def drain(pipe, chunks, event=None):
        for chunk in iter(lambda: os.read(pipe.fileno(), 1 << 16), b""):
            chunks.append(chunk)
            if event is not None:
                event.set()
    readers = [threading.Thread(target=drain, args=(proc.stdout, out)),
               threading.Thread(target=drain, args=(proc.stderr, err, started))]
    for reader in readers:
        reader.start()
    proc.stdin.write(stdin)
    proc.stdin.close()
    try:
        assert started.wait(120), "the command printed nothing"
        start = time.monotonic()
        for delay in presses:
            time.sleep(max(0.0, delay - (time.monotonic() - start)))
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)  # a guard against a hang, not a timing assertion
        seconds = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for reader in readers:
        reader.join()
    return proc.returncode, b"".join(out).decode(), b"".join(err).decode(), seconds


def test_held_signals_hold_a_press_from_any_thread_until_the_step_is_done():
    """A Ctrl-C the kernel hands to another thread still waits for the end of the step, and is
    raised as it ends: blocking the signal in the main thread alone would not hold it."""
    from minigemma.uninterrupted import held_signals
    steps = []
    arrived, wakeup = socket.socketpair()  # Python's C handler writes each signal number here
    wakeup.setblocking(False)
    previous = signal.set_wakeup_fd(wakeup.fileno())
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):
            with held_signals():
                presser = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
                presser.start()
                presser.join()
                arrived.settimeout(300)  # a guard against a hang, not a timing assertion
                assert arrived.recv(1) == bytes([signal.SIGINT])  # whichever thread took it
                for _ in range(100):  # bytecodes: the main thread runs the held handler here
                    pass
                steps.append("finished")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.set_wakeup_fd(previous)
        arrived.close()
        wakeup.close()
    assert steps == ["finished"]


def random_presses(rng, span):
    """One to eight presses at random moments in [0, span]; half the time in a burst."""
    n = rng.choice([1, 1, 2, 3, 8])
    if rng.random() < 0.5:
        first = rng.uniform(0, span)
        return [first + rng.uniform(0, 0.05) * i for i in range(n)]
    return sorted(rng.uniform(0, span) for _ in range(n))


def assert_clean(code, err):
    assert code in (0, 130), (code, err[-3000:])
    assert not any(word in err for word in BAD), err[-3000:]


# ----------------------------------------------------------------------------------------------
# generate


GENERATE = ["generate", "--max-new-tokens", "300", "Once upon a time"]


@pytest.fixture(scope="module")
def generated(weights):
    """(the uninterrupted text, how long the run took)."""
    code, out, err, seconds = run([*GENERATE[:1], "--weights", weights, *GENERATE[1:]])
    assert code == 0 and len(out) > 200 and len(set(out)) > 10, (out, err)
    return out, seconds


def generate_trials(weights, generated, n, seed):
    full, span = generated
    rng = random.Random(seed)
    outcomes = {0: 0, 130: 0}
    for _ in range(n):
        code, out, err, _ = run([*GENERATE[:1], "--weights", weights, *GENERATE[1:]],
                                presses=random_presses(rng, span))
        assert_clean(code, err)
        assert full.startswith(out.rstrip("\n")), (out[-200:], err[-2000:])  # the text so far
        if code == 0:
            assert out == full
        else:
            assert "interrupted" in err or "stopped: Ctrl-C" in err, err
        outcomes[code] += 1
    return outcomes


def test_generate_stops_cleanly_at_any_moment(weights, generated):
    generate_trials(weights, generated, TRIALS, seed=1)


@pytest.mark.slow
def test_generate_stops_cleanly_at_any_moment_many_times(weights, generated):
    n = SLOW_TRIALS["generate"]
    outcomes = generate_trials(weights, generated, n, seed=2)
    print(f"\ngenerate: {n} trials, exit codes {outcomes}")


# ----------------------------------------------------------------------------------------------
# chat


@pytest.fixture(scope="module")
def chatted(weights):
    """(the uninterrupted first answer, how long the whole conversation took)."""
    code, out, err, seconds = run(["chat", "--weights", weights, "--max-new-tokens", "120"],
                                  stdin=b"Hello there\n")
    assert code == 0 and len(set(out)) > 10, (out, err)
    return out, 3 * seconds


def chat_trials(weights, chatted, n, seed):
    first, span = chatted
    rng = random.Random(seed)
    outcomes = {0: 0, 130: 0}
    for _ in range(n):
        code, out, err, _ = run(["chat", "--weights", weights, "--max-new-tokens", "120"],
                                stdin=CHAT_INPUT, presses=random_presses(rng, span))
        assert_clean(code, err)
        assert "error:" not in err, err
        last_interrupted = "(answer interrupted)" in err.rpartition("conversation reset")[2]
        if code == 0 and not last_interrupted:  # the chat went on: after /reset, the first
            assert out.endswith(first), (out[-300:], err[-2000:])  # answer again, in full
        outcomes[code] += 1
    return outcomes


def test_chat_stops_an_answer_and_goes_on(weights, chatted):
    chat_trials(weights, chatted, TRIALS, seed=3)


@pytest.mark.slow
def test_chat_stops_an_answer_and_goes_on_many_times(weights, chatted):
    n = SLOW_TRIALS["chat"]
    outcomes = chat_trials(weights, chatted, n, seed=4)
    print(f"\nchat: {n} trials, exit codes {outcomes}")


# ----------------------------------------------------------------------------------------------
# golden record


@pytest.fixture(scope="module")
def recording(weights, tmp_path_factory):
    """(prompts file, a golden recorded from them earlier, how long recording took)."""
    base = tmp_path_factory.mktemp("prompts")
    rng = np.random.default_rng(1)
    rows = [{"name": f"p{i}", "ids": [2] + rng.integers(3, 512, 1 + i % 30).tolist()}
            for i in range(24)]
    prompts = base / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    previous = str(base / "previous")
    code, _, err, seconds = run(["golden", "record", "--weights", weights, "--prompts",
                                 str(prompts), "--out", previous, "--new-tokens", "4"])
    assert code == 0, err
    return str(prompts), previous, seconds


def record_trials(weights, recording, tmp_path, n, seed):
    prompts, previous, span = recording
    before = golden.load(previous).arrays
    rng = random.Random(seed)
    outcomes = {0: 0, 130: 0}
    for trial in range(n):
        parent = tmp_path / f"t{trial}"
        out = parent / "G"
        shutil.copytree(previous, out)
        # the new golden differs from the previous one: 3 greedy tokens instead of 4
        code, _, err, _ = run(["golden", "record", "--weights", weights, "--prompts", prompts,
                               "--out", str(out), "--new-tokens", "3", "--force"],
                              presses=random_presses(rng, span))
        assert_clean(code, err)
        assert os.listdir(parent) == ["G"], os.listdir(parent)  # no temporary directory left
        arrays = golden.load(out).arrays
        greedy = len(arrays["p0/greedy"])
        assert greedy == (3 if code == 0 else greedy) and greedy in (3, 4)
        if greedy == 4:
            assert all(np.array_equal(arrays[k], before[k]) for k in before)
        outcomes[code] += 1
    return outcomes


def test_golden_record_stops_cleanly_and_keeps_one_golden(weights, recording, tmp_path):
    record_trials(weights, recording, tmp_path, TRIALS, seed=5)


@pytest.mark.slow
def test_golden_record_stops_cleanly_many_times(weights, recording, tmp_path):
    n = SLOW_TRIALS["golden record"]
    outcomes = record_trials(weights, recording, tmp_path, n, seed=6)
    print(f"\ngolden record: {n} trials, exit codes {outcomes}")


# ----------------------------------------------------------------------------------------------
# convert


@pytest.fixture(scope="module")
def converted(weights, tmp_path_factory):
    """{"hf" | "gguf": a conversion of the checkpoint made earlier, to be replaced}, and how long
    converting took. The earlier ones are float16 GGUF / another checkpoint, so that the old and
    the new output can be told apart."""
    base = tmp_path_factory.mktemp("converted")
    previous = {"hf": str(base / "previous-hf"), "gguf": str(base / "previous.gguf")}
    start = time.monotonic()
    code, _, err, _ = run(["convert", weights, previous["gguf"], "--outtype", "f16"])
    assert code == 0, err
    shutil.copytree(weights, previous["hf"])
    os.remove(os.path.join(previous["hf"], "tokenizer.model"))  # the new one will have it
    return previous, time.monotonic() - start


def convert_trials(weights, converted, tmp_path, n, seed):
    previous, span = converted
    reference = minigemma.load(weights).weights
    rng = random.Random(seed)
    outcomes = {0: 0, 130: 0}
    for trial in range(n):
        kind = ("hf", "gguf")[trial % 2]
        parent = tmp_path / f"t{trial}"
        parent.mkdir()
        dst = parent / ("out" if kind == "hf" else "out.gguf")
        (shutil.copytree if kind == "hf" else shutil.copy)(previous[kind], dst)
        code, _, err, _ = run(["convert", weights, str(dst), "--force"],
                              presses=random_presses(rng, span))
        assert_clean(code, err)
        assert os.listdir(parent) == [dst.name], os.listdir(parent)
        model = minigemma.load(dst)  # complete: the previous output or the new one
        new = (os.path.exists(dst / "tokenizer.model") if kind == "hf"
               else model.weights["model.norm.weight"].dtype == np.float32
               and model.weights["model.layers.0.mlp.up_proj.weight"].dtype == np.float32)
        assert new or code == 130
        if new and kind == "gguf":  # matrices bit for bit (norms pass through 1 + w and back)
            assert all(np.array_equal(model.weights[k], w) for k, w in reference.items()
                       if w.ndim == 2)
        outcomes[code] += 1
    return outcomes


def test_convert_stops_cleanly_and_keeps_one_checkpoint(weights, converted, tmp_path):
    convert_trials(weights, converted, tmp_path, TRIALS, seed=7)


@pytest.mark.slow
def test_convert_stops_cleanly_many_times(weights, converted, tmp_path):
    n = SLOW_TRIALS["convert"]
    outcomes = convert_trials(weights, converted, tmp_path, n, seed=8)
    print(f"\nconvert: {n} trials, exit codes {outcomes}")
