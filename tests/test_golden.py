"""Golden files: record, load, compare, check, the CLI, and all-or-nothing writes.

The numbers in a golden are checked against transformers (the independent peer) on the same
checkpoint: logits within the recorded tolerance (atol 1e-4 + rtol 1e-4 x |logit|, logits are
O(1-10)) and identical greedy tokens. The rest tests the format and the tools around it.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import minigemma
from minigemma import golden
from hf_peer import load_peer, peer_greedy, peer_logits

REPO = os.path.join(os.path.dirname(__file__), os.pardir)


def ids(length, seed):
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(3, 512, size=length - 1).tolist()


PROMPTS = [{"name": "one", "ids": [2]}, {"name": "short", "ids": ids(9, 0)},
           {"name": "long", "ids": ids(150, 1)}]


@pytest.fixture(scope="module")
def weights(tiny_checkpoints):
    return tiny_checkpoints["mqa", "bf16"]


@pytest.fixture(scope="module")
def recorded(weights, tmp_path_factory):
    """A golden of PROMPTS: full logits up to 16 tokens (so "long" is stored as top-8), 12 greedy
    tokens, activations of "short"."""
    out = str(tmp_path_factory.mktemp("golden") / "G")
    golden.record(weights, PROMPTS, out, activations=["short"], new_tokens=12,
                  full_logits_max_tokens=16, top_k=8)
    return out


def write_prompts(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def run_cli(*args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "minigemma", *args], capture_output=True,
                          text=True, env=env, **kwargs)


# ----------------------------------------------------------------------------------------------
# The format, read with json and numpy alone


def test_golden_files_follow_the_documented_format(recorded, weights):
    with open(os.path.join(recorded, "golden.json")) as f:
        meta = json.load(f)
    npz = np.load(os.path.join(recorded, "golden.npz"))
    assert sorted(os.listdir(recorded)) == ["golden.json", "golden.npz"]
    assert meta["format"] == "minigemma-golden" and meta["format_version"] == 1
    assert meta["minigemma_version"] == minigemma.__version__
    assert meta["model"]["n_kv_heads"] == 1 and meta["model"]["vocab_size"] == 512
    assert meta["precision"] == {"compute_dtype": "float32", "normalizer": "exact",
                                 "normalizer_value": float(np.float32(np.sqrt(64))),
                                 "weight_storage": "bfloat16"}
    with open(os.path.join(weights, "model.safetensors"), "rb") as f:
        assert meta["files"]["model.safetensors"] == hashlib.sha256(f.read()).hexdigest()
    assert set(meta["files"]) == {"config.json", "model.safetensors"}
    assert meta["generation"] == {"strategy": "greedy", "new_tokens": 12, "stop_on_eos": False}
    assert [p["name"] for p in meta["prompts"]] == ["one", "short", "long"]
    assert [p["logits"] for p in meta["prompts"]] == ["full", "full", "top8"]
    assert [p["activations"] for p in meta["prompts"]] == [False, True, False]

    assert npz["short/tokens"].tolist() == PROMPTS[1]["ids"]
    assert npz["short/logits"].shape == (9, 512) and npz["short/logits"].dtype == np.float32
    assert npz["short/greedy"].shape == (12,)
    assert npz["long/last_logits"].shape == (512,)
    assert npz["long/topk_ids"].shape == npz["long/topk_logits"].shape == (150, 8)
    assert "long/logits" not in npz.files and "one/embed" not in npz.files
    points = golden.activation_points(2)
    assert meta["activation_points"] == points and len(points) == 2 * 8 + 3
    shapes = {"embed": (9, 64), "layers.1.q_rope": (9, 4, 32), "layers.1.k_rope": (9, 1, 32),
              "layers.1.attn_out": (9, 128), "layers.1.ffn_out": (9, 64), "logits": (9, 512)}
    for point, shape in shapes.items():
        assert npz[f"short/{point}"].shape == shape, point
    assert all(f"short/{p}" in npz.files for p in points)


def test_golden_logits_and_greedy_tokens_match_transformers(recorded, weights):
    g = golden.load(recorded)
    peer = load_peer(weights)
    logits = {name: peer_logits(peer, ids) for name, ids in g.token_ids().items()}
    greedy = {name: peer_greedy(peer, ids, 12) for name, ids in g.token_ids().items()}
    report = golden.assert_matches(g, logits, greedy_by_prompt=greedy)
    assert [r.name for r in report.results] == ["one", "short", "long"]
    assert all(r.first_greedy_diff is None for r in report.results)
    # the top-k form holds transformers' own top-8 ids (no near-ties in random logits)
    top = np.argsort(-logits["long"], axis=-1)[:, :8]
    assert np.array_equal(np.sort(top, -1), np.sort(g.prompt_arrays("long")["topk_ids"], -1))


def test_record_encodes_text_and_chat_prompts_with_the_tokenizer(weights, tmp_path):
    from minigemma.tokenizer import Tokenizer
    from minigemma.tiny_tokenizer import train_tiny_tokenizer
    tokenizer = train_tiny_tokenizer(str(tmp_path / "tokenizer.model"))
    rows = [{"name": "text", "text": "Hello, world!"},
            {"name": "raw", "text": "Hello, world!", "bos": False},
            {"name": "chat", "chat": [{"role": "user", "content": "Hi there"}]}]
    out = golden.record(weights, write_prompts(tmp_path / "p.jsonl", rows), str(tmp_path / "G"),
                        tokenizer=tokenizer, new_tokens=2)
    g, tok = golden.load(out), Tokenizer(tokenizer)
    assert g.token_ids()["text"].tolist() == tok.encode("Hello, world!")
    assert g.token_ids()["raw"].tolist() == tok.encode("Hello, world!", bos=False)
    assert g.token_ids()["chat"].tolist() == tok.chat_ids([{"role": "user", "content": "Hi there"}])
    assert g.prompts[0]["text"] == "Hello, world!"
    assert g.meta["files"]["tokenizer.model"] == golden.files.sha256_file(tokenizer)


# ----------------------------------------------------------------------------------------------
# compare: the library helper other projects call


def test_compare_reports_errors_per_prompt(recorded):
    g = golden.load(recorded)
    exact = {"short": g.prompt_arrays("short")["logits"], "one": g.prompt_arrays("one")["logits"]}
    report = golden.compare(g, exact)
    assert report.passed and [r.max_abs for r in report.results] == [0.0, 0.0]

    off = exact["short"].copy()
    off[3, 7] += 0.01
    greedy = [*g.prompt_arrays("short")["greedy"][:5], -1, -1]  # differs from token 5 on
    report = golden.compare(g, {"short": off, "one": exact["one"]},
                            greedy_by_prompt={"short": greedy})
    bad = report.results[1]
    assert not report.passed and bad.name == "short" and not bad.passed
    assert bad.max_abs == pytest.approx(0.01, rel=1e-3)
    assert bad.max_rel == pytest.approx(0.01 / np.abs(exact["short"]).max(), rel=1e-3)
    assert bad.first_greedy_diff == 5
    assert golden.compare(g, {"short": off}, atol=0.02, rtol=0).passed  # tolerances override

    with pytest.raises(AssertionError, match=r"short .* FAIL"):
        golden.assert_matches(g, {"short": off})
    with pytest.raises(ValueError, match="no prompt named 'nope'"):
        golden.compare(g, {"nope": off})


def test_compare_names_a_missing_bos(recorded):
    g = golden.load(recorded)
    without_bos = g.prompt_arrays("short")["logits"][1:]
    report = golden.compare(g, {"short": without_bos})
    assert not report.passed
    problem = report.results[0].problem
    assert "expected [9, V]" in problem and "check BOS" in problem


def test_compare_top_k_form_uses_the_golden_ids(recorded, weights):
    g = golden.load(recorded)
    logits = minigemma.load(weights).forward(g.token_ids()["long"])
    assert golden.compare(g, {"long": logits}).passed
    logits[10, g.prompt_arrays("long")["topk_ids"][10, 3]] += 1e-3  # one of the stored logits
    assert not golden.compare(g, {"long": logits}).passed


# ----------------------------------------------------------------------------------------------
# check: minigemma against its own golden


def test_check_passes_on_the_recorded_weights(recorded, weights):
    report = golden.check(recorded, weights)
    assert report.passed, str(report)
    assert all(r.max_abs <= 1e-6 for r in report.results)


def test_check_fails_on_other_weights(recorded, tiny_checkpoints):
    # the same random model stored as float32: weights differ by bfloat16 rounding
    other = tiny_checkpoints["mqa", "f32"]
    report = golden.check(recorded, other)
    assert not report.passed
    assert any("model.safetensors is not the file the golden was recorded from" in p
               for p in report.problems)
    assert max(r.max_abs for r in report.results) > 1e-3
    assert "FAIL" in str(report)


def test_load_rejects_what_is_not_a_golden(tmp_path, recorded):
    with pytest.raises(FileNotFoundError, match="golden.json: missing"):
        golden.load(str(tmp_path))
    meta = json.load(open(os.path.join(recorded, "golden.json")))
    os.makedirs(tmp_path / "v2")
    json.dump({**meta, "format_version": 2}, open(tmp_path / "v2" / "golden.json", "w"))
    np.savez(tmp_path / "v2" / "golden.npz", x=np.zeros(1))
    with pytest.raises(ValueError, match="version 2; this minigemma reads .* version 1"):
        golden.load(str(tmp_path / "v2"))


# ----------------------------------------------------------------------------------------------
# Prompts files


@pytest.mark.parametrize("line, message", [
    ("{not json", r"p.jsonl:2: not valid JSON"),
    ('{"name": "a", "ids": [2]}', r"p.jsonl:2: prompt name 'a' is used twice"),
    ('{"name": "b"}', r"p.jsonl:2: prompt 'b' needs exactly one of 'text', 'chat', 'ids'"),
    ('{"name": "b", "text": "x", "ids": [2]}', r"exactly one of .* \(found \['text', 'ids'\]\)"),
    ('{"name": "b c", "ids": [2]}', r"p.jsonl:2: 'name' must be"),
    ('{"name": "b", "ids": []}', r"p.jsonl:2: prompt 'b': 'ids' must be a non-empty list"),
])
def test_prompts_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"name": "a", "ids": [2]}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        golden.read_prompts(str(path))


def test_text_prompt_without_tokenizer_is_a_clear_error(weights, tmp_path):
    with pytest.raises(ValueError, match="prompt 't' is text, so recording it needs a tokenizer"):
        golden.record(weights, [{"name": "t", "text": "hi"}], str(tmp_path / "G"))
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# All-or-nothing writes


def test_failed_record_leaves_no_golden_and_no_debris(weights, tmp_path, monkeypatch):
    calls = []
    forward = minigemma.Gemma.forward

    def fails_on_second_prompt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:  # the first prompt runs prefill + 2 greedy steps
            raise RuntimeError("disk on fire")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(minigemma.Gemma, "forward", fails_on_second_prompt)
    with pytest.raises(RuntimeError, match="disk on fire"):
        golden.record(weights, PROMPTS, str(tmp_path / "G"), new_tokens=3)
    assert os.listdir(tmp_path) == []


def test_failed_npz_write_leaves_no_debris(weights, tmp_path, monkeypatch):
    add_array = golden.add_array

    def disk_full(npz, name, array):
        if name.endswith("/greedy"):  # after "tokens" and "logits" were written
            raise OSError("No space left on device")
        add_array(npz, name, array)

    monkeypatch.setattr(golden.recording, "add_array", disk_full)
    with pytest.raises(OSError, match="No space left"):
        golden.record(weights, PROMPTS[:1], str(tmp_path / "G"), new_tokens=1)
    assert os.listdir(tmp_path) == []


def test_existing_golden_is_kept_unless_forced(recorded, weights, tmp_path):
    out = str(tmp_path / "G")
    golden.record(weights, PROMPTS[:1], out, new_tokens=1)
    with pytest.raises(FileExistsError, match="already exists"):
        golden.record(weights, PROMPTS[1:2], out, new_tokens=1)
    assert [p["name"] for p in golden.load(out).prompts] == ["one"]
    golden.record(weights, PROMPTS[1:2], out, new_tokens=1, overwrite=True)
    assert [p["name"] for p in golden.load(out).prompts] == ["short"]
    assert sorted(os.listdir(tmp_path)) == ["G"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killed_record_command_leaves_no_golden_and_no_debris(weights, tmp_path, sig):
    """`minigemma golden record` stopped mid-way (a CI timeout's SIGTERM, or Ctrl-C).

    No race: the recorder writes a progress line per prompt to a pipe this test stops reading, and
    the lines add up to far more than a pipe holds (64 KB), so the recorder cannot finish before
    the signal, however fast the machine."""
    long_name = "x" * 150  # ~200 bytes per progress line, 1000 lines: ~200 KB
    prompts = write_prompts(tmp_path / "p.jsonl", [{"name": f"p{i}_{long_name}", "ids": [2, 5, 6]}
                                                   for i in range(1000)])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-m", "minigemma", "golden", "record",
                             "--weights", weights, "--prompts", prompts,
                             "--out", str(out_dir / "G"), "--new-tokens", "1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:  # wait until it is recording
        if line.startswith("minigemma: [3/1000]"):
            break
    assert os.listdir(out_dir), "expected the temporary directory while recording"
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert os.listdir(out_dir) == []


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_record_then_check(weights, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:2])
    out = str(tmp_path / "G")
    rec = run_cli("golden", "record", "--weights", weights, "--prompts", prompts, "--out", out,
                  "--activations", "--new-tokens", "4")
    assert rec.returncode == 0, rec.stderr
    assert "[1/2] one: 1 tokens, full logits, 4 greedy tokens" in rec.stderr
    assert "[2/2] short: 9 tokens" in rec.stderr
    assert [p["activations"] for p in golden.load(out).prompts] == [True, True]

    chk = run_cli("golden", "check", out, "--weights", weights)
    assert chk.returncode == 0, chk.stderr
    assert "2/2 prompts within atol=0.0001, rtol=0.0001: PASS" in chk.stdout
    assert "short" in chk.stdout and "same" in chk.stdout


def test_cli_check_fails_with_nonzero_exit(recorded, tiny_checkpoints):
    chk = run_cli("golden", "check", recorded, "--weights", tiny_checkpoints["mqa", "f32"])
    assert chk.returncode == 1
    assert "FAIL" in chk.stdout and "sha256 differs" in chk.stdout


def test_cli_errors_are_one_line(tmp_path, weights):
    res = run_cli("golden", "check", str(tmp_path), "--weights", weights)
    assert res.returncode != 0
    assert "golden.json: missing" in res.stderr and "Traceback" not in res.stderr


def test_standard_prompts_file_records(tiny_checkpoints, tmp_path):
    """weights/prompts.jsonl, the prompts everyone with the real weights records, goes through
    record (here on a tiny model with the tiny tokenizer; the long prompt in the top-k form)."""
    from minigemma.tiny_tokenizer import train_tiny_tokenizer
    path = os.path.join(REPO, "weights", "prompts.jsonl")
    prompts = golden.read_prompts(path)
    kinds = {p["name"].split("-")[0] for p in prompts}
    assert kinds == {"base", "code", "i18n", "chat", "long"}
    out = golden.record(tiny_checkpoints["gqa", "bf16"], path, str(tmp_path / "G"), new_tokens=2,
                        tokenizer=train_tiny_tokenizer(str(tmp_path / "tokenizer.model")))
    g = golden.load(out)
    assert [p["logits"] for p in g.prompts][-1] == "top64"
    assert len(g.token_ids()["long-license"]) > 2000
