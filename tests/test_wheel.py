"""Everything the `minigemma` command offers works from an installed wheel, outside the source tree.

The wheel is built from a copy of what pyproject.toml packages (pip wheel, setuptools, no network)
and installed by pip into a fresh venv that has nothing else but the distributions the wheel
declares (Requires-Dist, and what those require): numpy, numba, llvmlite, sentencepiece. They are
linked from the Python running the tests instead of downloaded again, so the test needs no
network; `pip check` confirms they satisfy the wheel's requirements, and torch, transformers and
the repository are out of the venv's reach. Then every subcommand runs from a directory outside
the source tree, on a copy of examples/tiny-gemma: generate and chat print the text the source
tree's own command prints (same code, same machine, greedy: the same tokens), golden record /
check / diff give their verdicts, and bench runs its minigemma worker (`python -m minigemma.bench`)
on the tiny checkpoint without generating the 2B one. About a minute, most of it numba compiling
the kernels for the new install.
"""

import email
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "tiny-gemma"


def run(command, cwd, env=None, stdin=None, check=True):
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, input=stdin,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command))} exited {result.returncode}:\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def build_wheel(out):
    """The wheel of a copy of the packaged files (a build leaves build/ and *.egg-info behind)."""
    source = out / "source"
    shutil.copytree(REPO / "minigemma", source / "minigemma",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", out / "dist", source], cwd=out)
    (wheel,) = (out / "dist").glob("minigemma-*.whl")
    return wheel


def runtime_distributions(wheel):
    """Names of the distributions the wheel needs at run time: its Requires-Dist and theirs,
    extras left out."""
    with zipfile.ZipFile(wheel) as z:
        (metadata,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        todo = email.message_from_bytes(z.read(metadata)).get_all("Requires-Dist") or []
    needed = set()
    while todo:
        requirement = Requirement(todo.pop())
        name = canonicalize_name(requirement.name)
        if name in needed or (requirement.marker and
                              not requirement.marker.evaluate({"extra": ""})):
            continue
        needed.add(name)
        todo += importlib.metadata.distribution(name).requires or []
    return needed


def link_distribution(name, site_packages):
    """Symlink an installed distribution's top-level files (package, .libs, .dist-info)."""
    dist = importlib.metadata.distribution(name)
    tops = {pathlib.PurePath(f).parts[0] for f in dist.files if pathlib.PurePath(f).parts[0] != ".."}
    for top in tops:
        os.symlink(dist.locate_file(top), site_packages / top)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin directory, a working directory outside the source tree, environment)"""
    root = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(root)
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    site_packages = pathlib.Path(run([python, "-c", "import sysconfig; "
                                      "print(sysconfig.get_path('purelib'))"], cwd=root).stdout.strip())
    for name in runtime_distributions(wheel):
        link_distribution(name, site_packages)
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
         "--no-index", wheel], cwd=root)
    run([sys.executable, "-m", "pip", "--python", python, "check"], cwd=root)

    work = root / "work"
    shutil.copytree(TINY, work / "tiny-gemma")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["MINIGEMMA_CACHE"] = str(root / "cache")  # the bench lock, and no 2B checkpoint, go here
    return venv / "bin", work, env


def source_tree_cli(*args, stdin=None):
    """The same subcommand run by the source tree's minigemma, for reference."""
    return run([sys.executable, "-m", "minigemma", *args], cwd=REPO, stdin=stdin).stdout


def test_the_wheel_runs_apart_from_the_source_tree(installed):
    bin_dir, work, env = installed
    found = json.loads(run([bin_dir / "python", "-c", "import importlib.util, json, minigemma; "
                            "print(json.dumps([minigemma.__file__, "
                            "importlib.util.find_spec('torch') is None]))"],
                           cwd=work, env=env).stdout)
    assert found[0].startswith(str(bin_dir.parent)), found[0]
    assert found[1], "torch is importable in the wheel's venv: it is not isolated"


def test_generate(installed):
    bin_dir, work, env = installed
    args = ["generate", "--weights", "tiny-gemma", "--max-new-tokens", "12", "Gemma is"]
    out = run([bin_dir / "minigemma", *args], cwd=work, env=env)
    expected = source_tree_cli(*args[:2], str(TINY), *args[3:])
    assert out.stdout.strip() and out.stdout == expected
    assert "decode: 12 new tokens" in out.stderr


def test_chat(installed):
    bin_dir, work, env = installed
    messages = "Hello!\n/reset\nWhat is a tokenizer?\n"
    # Sampled and seeded: the greedy answers of the tiny random model are blank lines.
    args = ["chat", "--weights", "tiny-gemma", "--max-new-tokens", "8", "--temperature", "1",
            "--seed", "0"]
    out = run([bin_dir / "minigemma", *args], cwd=work, env=env, stdin=messages)
    expected = source_tree_cli(*args[:2], str(TINY), *args[3:], stdin=messages)
    assert out.stdout.strip() and out.stdout == expected
    assert "conversation reset" in out.stderr


def test_golden_record_check_diff(installed):
    bin_dir, work, env = installed
    prompts = work / "prompts.jsonl"
    prompts.write_text('{"name": "text", "text": "The quick brown fox"}\n'
                       '{"name": "chat", "chat": [{"role": "user", "content": "Hi"}]}\n')
    minigemma = bin_dir / "minigemma"
    run([minigemma, "golden", "record", "--weights", "tiny-gemma", "--prompts", prompts,
         "--out", "G", "--activations", "--new-tokens", "4"], cwd=work, env=env)
    check = run([minigemma, "golden", "check", "G", "--weights", "tiny-gemma"], cwd=work, env=env)
    assert "2/2 prompts within" in check.stdout and "PASS" in check.stdout

    # diff: the golden's own activations do not diverge; one changed point does, and is named.
    stored = dict(np.load(work / "G" / "golden.npz"))
    point = "layers.1.ffn_out"
    np.savez(work / "same.npz", **stored)
    stored[f"chat/{point}"] = stored[f"chat/{point}"] + 1.0
    np.savez(work / "changed.npz", **stored)
    same = run([minigemma, "golden", "diff", "G", "same.npz"], cwd=work, env=env)
    assert "no divergence" in same.stdout
    changed = run([minigemma, "golden", "diff", "G", "changed.npz"], cwd=work, env=env, check=False)
    assert changed.returncode == 1, changed.stderr
    assert "chat: first divergence" in changed.stdout and f"({point})" in changed.stdout


def test_bench_on_a_given_checkpoint(installed):
    bin_dir, work, env = installed
    out = run([bin_dir / "minigemma", "bench", "--checkpoint", "tiny-gemma", "--peers",
               "minigemma", "--tokens", "2", "--reps", "1", "--prefill-reps", "1", "--prompt", "8"],
              cwd=work, env=env)
    assert out.stdout.count("\n| minigemma | ") == 1, out.stdout
    assert "minigemma: numba kernel compile" in out.stdout
    cache = pathlib.Path(env["MINIGEMMA_CACHE"])
    assert sorted(os.listdir(cache)) == ["full-size.lock"]  # the lock was taken; no 2B checkpoint


def test_random_checkpoint_from_the_wheel(installed):
    """What `minigemma bench` generates when no --checkpoint is given: the directory comes from
    $MINIGEMMA_CACHE, and the tokenizer step (the tiny tokenizer padded to the vocabulary) runs
    with the runtime dependencies alone. The 5 GB of weights themselves are not written here."""
    bin_dir, work, env = installed
    code = ("import sys; from minigemma import random_checkpoint as r, Tokenizer; "
            "print(r.default_dir('2b')); r.write_tokenizer(sys.argv[1], 1000); "
            "print(Tokenizer(sys.argv[1] + '/tokenizer.model').vocab_size)")
    (work / "padded").mkdir()
    out = run([bin_dir / "python", "-c", code, "padded"], cwd=work, env=env).stdout.split()
    assert out == [os.path.join(env["MINIGEMMA_CACHE"], "gemma-2b-shape"), "1000"]
