"""The command line as a user runs it: `python -m minigemma ...` in a subprocess (exit codes, the
streamed text, stderr), the chat loop driven through stdin, and the chat's KV cache reuse.

The text the CLI prints is checked against transformers' greedy generate on the same checkpoint
(decoded by the same tokenizer), and against the Python API for sampled and chat output (whose
distributions tests/test_sampling.py checks against transformers).
"""

import contextlib
import os
import select
import signal
import subprocess
import sys

import numpy as np
import pytest

import minigemma
from hf_peer import load_peer, peer_greedy
from minigemma.sampling import Chat, Sampler

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TINY = os.path.join(ROOT, "examples", "tiny-gemma")
TOKENIZER = os.path.join(TINY, "tokenizer.model")


def command(*args):
    return [sys.executable, "-m", "minigemma", *args]


def environment():
    """As a user's shell has it: stdout block-buffered into a pipe (no PYTHONUNBUFFERED)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}


@contextlib.contextmanager
def running(*args, stdin=None, stderr=subprocess.PIPE):
    """The CLI as a live process with piped stdout; killed on the way out if it is still running."""
    proc = subprocess.Popen(command(*args), stdin=stdin, stdout=subprocess.PIPE, stderr=stderr,
                            cwd=ROOT, env=environment())
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def cli(*args, stdin=None):
    return subprocess.run(command(*args), input=stdin, capture_output=True, text=True, cwd=ROOT,
                          env=environment(), timeout=600)


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("minigemma: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def tokenizer():
    return minigemma.Tokenizer(TOKENIZER)


# ----------------------------------------------------------------------------------------------
# minigemma generate


def test_generate_streams_transformers_greedy_text_and_reports_speeds(tiny_checkpoints, tokenizer):
    path = tiny_checkpoints["gqa", "bf16"]
    text = "Once upon a time"
    peer_ids = peer_greedy(load_peer(path), tokenizer.encode(text), 30)
    assert not {tokenizer.eos_id, tokenizer.end_of_turn_id} & set(peer_ids)  # runs all 30
    result = cli("generate", "--weights", path, "--tokenizer", TOKENIZER, "--max-new-tokens", "30",
                 text)
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode(peer_ids) + "\n"
    prompt_tokens = len(tokenizer.encode(text))
    assert f"prefill: {prompt_tokens} prompt tokens in" in result.stderr
    assert "decode: 30 new tokens, 29 decode steps in" in result.stderr
    assert "first token after" in result.stderr and result.stderr.count("tok/s") == 2
    assert f"loading {path}" in result.stderr and "512 pieces" in result.stderr


def test_generate_with_a_seed_is_reproducible_and_equals_the_python_api(tokenizer):
    args = ["--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--seed", "7",
            "--max-new-tokens", "40"]
    first = cli("generate", "--weights", TINY, *args, "The model")
    assert first.returncode == 0, first.stderr
    assert cli("generate", "--weights", TINY, *args, "The model").stdout == first.stdout
    api = minigemma.generate(minigemma.load(TINY), tokenizer, "The model", temperature=1.0,
                             top_k=50, top_p=0.9, seed=7, max_new_tokens=40)
    assert first.stdout == api + "\n"
    other_seed = cli("generate", "--weights", TINY, *args[:-3], "8", "--max-new-tokens", "40",
                     "The model")
    assert other_seed.stdout != first.stdout


def test_generate_chat_wraps_the_prompt_in_the_chat_format(tokenizer):
    result = cli("generate", "--weights", TINY, "--chat", "--max-new-tokens", "20", "Hello there")
    assert result.returncode == 0, result.stderr
    ids = tokenizer.chat_ids([{"role": "user", "content": "Hello there"}])
    assert f"prefill: {len(ids)} prompt tokens" in result.stderr
    expected = minigemma.generate(minigemma.load(TINY), tokenizer, ids, max_new_tokens=20)
    assert result.stdout == expected + "\n"


def test_generate_streams_piece_by_piece_and_stops_cleanly_on_ctrl_c():
    """Text arrives in small pieces while generation goes on: unflushed output would arrive at
    exit or in blocks of the pipe buffer's 4-8 KB. (Greedy on this prompt runs 1000 tokens, 1.6
    KB of text, without <eos>.) Then Ctrl-C stops it: exit code 130, no traceback."""
    with running("generate", "--weights", TINY, "--max-new-tokens", "1000",
                 "The quick brown fox") as proc:
        first = os.read(proc.stdout.fileno(), 1 << 16)
        second = os.read(proc.stdout.fileno(), 1 << 16)
        assert 0 < len(first) < 1024 and second, (first, second)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err.decode()
    assert "stopped: Ctrl-C" in err.decode()  # after the current token, with the speeds so far


def test_chat_answers_arrive_before_the_next_message(tokenizer):
    """The whole first answer arrives while chat waits for the next message (not at exit)."""
    expected = python_chat(["Hello"], 24, tokenizer)[0] + "\n"
    with running("chat", "--weights", TINY, "--max-new-tokens", "24", stdin=subprocess.PIPE,
                 stderr=subprocess.DEVNULL) as proc:
        proc.stdin.write(b"Hello\n")
        proc.stdin.flush()
        received = b""
        while len(received) < len(expected.encode()):
            ready, _, _ = select.select([proc.stdout], [], [], 120)  # a guard against a hang
            assert ready, f"no answer while the chat waits for input; got {received!r}"
            received += os.read(proc.stdout.fileno(), 4096)
        assert proc.poll() is None  # still waiting for the next message
        assert received.decode() == expected
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0


# ----------------------------------------------------------------------------------------------
# Argument errors: one line, exit code 2, before anything loads


@pytest.mark.parametrize("args,fragment", [
    (["--temperature", "-1"], "temperature must be a number >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-k", "0"], "top_k must be an integer >= 1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["--seed", "-3"], "seed must be an integer >= 0"),
    (["--top-k", "many"], "argument --top-k: invalid int value: 'many'"),
    (["--weights", "/nonexistent/gemma"], "--weights /nonexistent/gemma: no such file or directory"),
    (["--tokenizer", "/nonexistent/tok.model"], "tokenizer /nonexistent/tok.model not found"),
])
def test_bad_arguments_are_rejected_before_loading(args, fragment):
    result = cli("generate", "--weights", TINY, *args, "Hello")
    assert_one_line_error(result, 2, fragment)
    assert "loading" not in result.stderr


def test_an_empty_prompt_is_rejected():
    assert_one_line_error(cli("generate", "--weights", TINY, "   "), 2, "the prompt is empty")


def test_missing_command():
    assert_one_line_error(cli(), 2, "COMMAND")
    # (generate without --weights runs the built-in model: tests/test_gemma3_gguf.py)


def test_chat_checks_its_arguments_too():
    assert_one_line_error(cli("chat", "--weights", TINY, "--temperature", "-0.5"), 2, "temperature")


def test_a_checkpoint_without_tokenizer_names_the_default_path(tiny_checkpoints):
    path = tiny_checkpoints["mqa", "f32"]
    result = cli("generate", "--weights", path, "Hello")
    assert_one_line_error(result, 2, os.path.join(path, "tokenizer.model"), "--tokenizer PATH")


# ----------------------------------------------------------------------------------------------
# Errors from the package: one line naming the file, exit code 1; --debug shows the traceback


def test_a_broken_checkpoint_is_one_line_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = cli("generate", "--weights", str(tmp_path), "--tokenizer", TOKENIZER, "Hello")
    assert_one_line_error(result, 1, str(tmp_path / "config.json"), "not valid JSON")
    debug = cli("generate", "--debug", "--weights", str(tmp_path), "--tokenizer", TOKENIZER, "Hi")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "not valid JSON" in debug.stderr
    before = cli("--debug", "generate", "--weights", str(tmp_path), "--tokenizer", TOKENIZER, "Hi")
    assert "Traceback" in before.stderr


def test_a_file_that_is_not_a_tokenizer_is_one_line(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    result = cli("generate", "--weights", TINY, "--tokenizer", str(bad), "Hello")
    assert_one_line_error(result, 1, str(bad))


# ----------------------------------------------------------------------------------------------
# minigemma chat


def python_chat(messages, max_new_tokens, tokenizer):
    """The same conversation through the Python API: the text of each answer."""
    chat = Chat(minigemma.load(TINY), tokenizer, Sampler(), max_new_tokens=max_new_tokens)
    answers = []
    for message in messages:
        if message == "/reset":
            chat.reset()
        else:
            answers.append("".join(chat.reply(message)))
    return answers


def test_chat_through_stdin_two_turns_and_reset(tokenizer):
    messages = ["Hello", "What is the capital of France?", "/reset", "Hello"]
    result = cli("chat", "--weights", TINY, "--max-new-tokens", "24", stdin="\n".join(messages))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "conversation reset" in result.stderr
    answers = python_chat(messages, 24, tokenizer)
    assert result.stdout == "".join(answer + "\n" for answer in answers)
    assert answers[2] == answers[0]  # after /reset the conversation starts afresh


def test_chat_quits_cleanly_on_ctrl_c_at_the_prompt():
    with running("chat", "--weights", TINY, stdin=subprocess.PIPE) as proc:
        while b"kernels ready" not in proc.stderr.readline():  # loaded: waiting for a message
            assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130) and b"Traceback" not in err


def count_fed_tokens(chat):
    """Record in chat.fed how many tokens each prefill and each decode step of chat feeds."""
    chat.fed = []
    prefill, step = chat.decoder.prefill, chat.decoder.step
    chat.decoder.prefill = lambda ids, cache: chat.fed.append(len(ids)) or prefill(ids, cache)
    chat.decoder.step = lambda token, cache: chat.fed.append(1) or step(token, cache)


class EndsTurnAfter:
    """Greedy, except that the n-th token chosen is <end_of_turn> (ending the first answer)."""

    def __init__(self, n, end_of_turn_id):
        self.calls, self.n, self.end_of_turn_id = 0, n, end_of_turn_id

    def __call__(self, logits):
        self.calls += 1
        return self.end_of_turn_id if self.calls == self.n else int(np.argmax(logits))


@pytest.mark.parametrize("first_answer_ends_at", ["max_new_tokens", "stop token"])
def test_a_new_chat_turn_feeds_only_its_own_tokens(tiny_checkpoints, tokenizer,
                                                   first_answer_ends_at):
    """Turn 2 feeds its new tokens (plus the last answer token if turn 1 stopped at
    max_new_tokens), never the history; and its answer equals transformers' greedy continuation
    of the whole conversation from scratch."""
    path = tiny_checkpoints["mha", "bf16"]
    model = minigemma.load(path)
    sampler = Sampler() if first_answer_ends_at == "max_new_tokens" else \
        EndsTurnAfter(6, tokenizer.end_of_turn_id)
    chat = Chat(model, tokenizer, sampler, max_new_tokens=10, max_len=1024)
    count_fed_tokens(chat)
    first = {}
    "".join(chat.reply("Hello", stats=first))
    assert first["stop"] == first_answer_ends_at
    first_prompt = tokenizer.chat_ids([{"role": "user", "content": "Hello"}])
    assert chat.fed[0] == len(first_prompt)

    chat.fed.clear()
    history = list(chat.ids)
    turn = tokenizer.chat_turn_ids("Tell me more.")
    unfed_answer_token = 1 if first["stop"] == "max_new_tokens" else 0
    second = {}
    tokens_before = len(chat.ids) + len(turn)
    "".join(chat.reply("Tell me more.", stats=second))
    assert chat.fed[0] == len(turn) + unfed_answer_token  # not the len(history) before it
    assert all(n == 1 for n in chat.fed[1:])  # then one token per decode step
    assert chat.ids[:tokens_before] == history + turn
    assert tokenizer.end_of_turn_id not in history[len(first_prompt):]  # stop token: not fed

    answer = chat.ids[tokens_before:]
    peer = peer_greedy(load_peer(path), np.array(history + turn), second["new_tokens"] + 1)
    assert answer == peer[:len(answer)]
    if second["stop"] == "stop token":
        assert peer[len(answer)] in (tokenizer.eos_id, tokenizer.end_of_turn_id)


def test_chat_that_fills_the_context_warns_then_asks_for_a_reset(tokenizer):
    chat = Chat(minigemma.load(TINY), tokenizer, Sampler(), max_new_tokens=100, max_len=40)
    with pytest.warns(UserWarning, match=r"the context is full \(40 positions\)"):
        first = "".join(chat.reply("Hello"))
    assert chat.cache.length == 40
    with pytest.raises(ValueError, match="already in the conversation do not fit in the context "
                                         "of 40 positions"):
        chat.reply("And then?")
    chat.reset()
    with pytest.warns(UserWarning, match="context is full"):
        assert "".join(chat.reply("Hello")) == first


# ----------------------------------------------------------------------------------------------
# Options reach the model


def test_model_options_reach_load(monkeypatch):
    from minigemma import cli as cli_module
    seen = {}
    real_load = cli_module.load
    monkeypatch.setattr(cli_module, "load",
                        lambda path, **kw: seen.update(kw) or real_load(path, **kw))
    args = cli_module.build_parser().parse_args(
        ["generate", "--weights", TINY, "--dtype", "float64", "--normalizer", "bf16",
         "--reproducible", "Hello"])
    cli_module.check_options(args)
    model, _ = cli_module.load_model(args)
    assert seen == dict(dtype=np.float64, normalizer="bf16", check_weights=False)
    assert args.reproducible
    assert model.dtype == np.float64 and args.tokenizer == os.path.join(TINY, "tokenizer.model")


def test_top_k_without_temperature_gets_a_note():
    result = cli("generate", "--weights", TINY, "--top-k", "5", "--max-new-tokens", "2", "Hi")
    assert result.returncode == 0 and "do nothing at temperature 0 (greedy)" in result.stderr


def test_ctrl_c_during_an_answer_stops_the_answer_not_the_chat():
    with running("chat", "--weights", TINY, "--max-new-tokens", "300",
                 stdin=subprocess.PIPE) as proc:
        proc.stdin.write(b"Hello\n")
        proc.stdin.flush()
        assert os.read(proc.stdout.fileno(), 1 << 16)  # the answer has started
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"/reset\nHello\n", timeout=300)
    assert proc.returncode == 0, err.decode()
    assert b"(answer interrupted)" in err and b"conversation reset" in err
    assert b"Traceback" not in err
