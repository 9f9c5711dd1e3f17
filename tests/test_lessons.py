"""The lessons are tests: every Python block of lessons/*.md runs, and what it prints must match.

A lesson is Markdown. Its ```python blocks run in order in one namespace, from the repository
root; the ```output block that follows a code block is exactly what that code must print (a code
block with no output block must print nothing). So the text of a lesson cannot drift from the code
of minigemma: change model.py in a way a lesson describes, and that lesson fails.

Blocks fenced as ```python real-weights need the real checkpoint in weights/gemma-2b. They run in
a separate test, marked slow, that is skipped (and reported as skipped) when the weights are absent.

How long each lesson takes: .venv/bin/python -m pytest tests/test_lessons.py --durations=0

Running a lesson by hand, from the repository root:
    .venv/bin/python tests/test_lessons.py lessons/04-rope.md            # run it, print the outputs
    .venv/bin/python tests/test_lessons.py --update lessons/04-rope.md   # rewrite its output blocks
"""

import contextlib
import fcntl
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
LESSONS = os.path.join(ROOT, "lessons")
REAL_WEIGHTS = os.path.join(ROOT, "weights", "gemma-2b")
BIG_MODEL_LOCK = "/tmp/minigemma-2b.lock"  # as tests/test_2b_shape.py
FENCE = re.compile(r"^```(\S*)\s*(.*)$")


class Block:
    """One ```python block of a lesson and the ```output block after it (None if there is none)."""

    def __init__(self, line, code, real_weights, expected, output_span):
        self.line = line                  # 1-based line of the opening fence
        self.code = code
        self.real_weights = real_weights
        self.expected = expected          # text of the ```output block, or None
        self.output_span = output_span    # (first, last) line index of that block, or None


def parse(text, path="lesson"):
    """The code blocks of a lesson, each with the output block that follows it."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence or fence.group(1) != "python":
            i += 1
            continue
        end = _closing_fence(lines, i, path)
        block = Block(i + 1, "\n".join(lines[i + 1:end]), fence.group(2) == "real-weights", None, None)
        nxt = end + 1
        while nxt < len(lines) and not lines[nxt].strip():
            nxt += 1
        if nxt < len(lines) and lines[nxt].strip() == "```output":
            close = _closing_fence(lines, nxt, path)
            block.expected = "\n".join(lines[nxt + 1:close])
            block.output_span = (nxt, close)
            end = close
        blocks.append(block)
        i = end + 1
    return blocks


def _closing_fence(lines, start, path):
    for j in range(start + 1, len(lines)):
        if lines[j].strip() == "```":
            return j
    raise ValueError(f"{path}:{start + 1}: code fence is never closed")


def normalise(text):
    """Output compared line by line, ignoring trailing spaces and trailing blank lines."""
    return "\n".join(line.rstrip() for line in text.rstrip().split("\n")) if text else ""


def run(path, real_weights=False):
    """Run the blocks of one lesson. Returns [(block, printed text or None if not run)]."""
    blocks = parse(open(path).read(), path)
    namespace = {"__name__": "__lesson__"}
    results = []
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with np.printoptions():  # a lesson may set print options; do not leak them
            for block in blocks:
                if block.real_weights and not real_weights:
                    results.append((block, None))
                    continue
                out = io.StringIO()
                code = compile(block.code, f"{path}:{block.line}", "exec")
                with contextlib.redirect_stdout(out):
                    exec(code, namespace)
                results.append((block, out.getvalue()))
    finally:
        os.chdir(cwd)
    return results


def mismatches(path, results):
    """A readable message for every block whose output differs from its ```output block."""
    problems = []
    for block, printed in results:
        if printed is None:
            continue
        expected = normalise(block.expected) if block.expected is not None else ""
        if normalise(printed) != expected:
            problems.append(f"{os.path.relpath(path, ROOT)}:{block.line}: the block printed\n"
                            f"{printed}\n--- but the lesson says ---\n{expected}\n")
    return problems


def lesson_files():
    return sorted(f for f in os.listdir(LESSONS) if re.match(r"\d\d-.*\.md$", f))


def has_real_weight_blocks(name):
    return any(b.real_weights for b in parse(open(os.path.join(LESSONS, name)).read()))


@pytest.mark.parametrize("name", lesson_files())
def test_lesson(name):
    path = os.path.join(LESSONS, name)
    problems = mismatches(path, run(path))
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in lesson_files() if has_real_weight_blocks(n)])
def test_lesson_with_real_weights(name):
    if not os.path.isdir(REAL_WEIGHTS):
        pytest.skip(f"{REAL_WEIGHTS} is absent; its blocks did not run (see weights/README.md)")
    path = os.path.join(LESSONS, name)
    with open(BIG_MODEL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one full-size model in memory at a time
        problems = mismatches(path, run(path, real_weights=True))
    assert not problems, "\n".join(problems)


def test_a_wrong_output_block_fails(tmp_path):
    """The checker itself: a lesson whose text disagrees with its code is reported."""
    lesson = tmp_path / "99-check.md"
    lesson.write_text("```python\nprint(6 * 7)\n```\n\n```output\n42\n```\n"
                      "```python\nprint('silent?')\n```\n"
                      "```python\nx = 1\n```\n\n```output\n1\n```\n")
    problems = mismatches(str(lesson), run(str(lesson)))
    assert len(problems) == 2
    assert ":8:" in problems[0] and "silent?" in problems[0]  # printed without an output block
    assert ":11:" in problems[1]                              # output block, printed nothing


@pytest.mark.parametrize("name", lesson_files())
def test_lesson_ends_with_things_to_try(name):
    text = open(os.path.join(LESSONS, name)).read()
    assert "\n## Things to try\n" in text, f"{name} has no '## Things to try' section"
    assert text.rindex("\n## ") == text.index("\n## Things to try\n"), f"{name}: it must come last"


def test_readme_links_every_lesson():
    readme = open(os.path.join(LESSONS, "README.md")).read()
    missing = [name for name in lesson_files() if f"({name})" not in readme]
    assert not missing, f"lessons/README.md does not link {missing}"


def test_figures_are_regenerated(tmp_path):
    """scripts/make_figures.py redraws every figure the lessons show, each a small PNG."""
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_figures.py"), str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True)
    committed = sorted(f for f in os.listdir(LESSONS) if f.endswith(".png"))
    drawn = sorted(f for f in os.listdir(tmp_path) if f.endswith(".png"))
    assert drawn == committed, f"make_figures.py drew {drawn}; lessons/ holds {committed}"
    for name in drawn:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
        assert len(data) < 200_000, f"{name} is {len(data)} bytes; keep figures under 200 KB"
    lessons_text = "".join(open(os.path.join(LESSONS, n)).read() for n in lesson_files())
    unused = [name for name in drawn if f"({name})" not in lessons_text]
    assert not unused, f"no lesson shows {unused}"


def update(path):
    """Rewrite the ```output blocks of a lesson with what its code prints now."""
    lines = open(path).read().split("\n")
    results = run(path, real_weights=os.path.isdir(REAL_WEIGHTS))
    for block, printed in reversed(results):  # from the end, so earlier line numbers stay valid
        if printed is None:
            continue
        new = ["```output", *normalise(printed).split("\n"), "```"] if normalise(printed) else []
        if block.output_span:
            first, last = block.output_span
            lines[first:last + 1] = new
        elif new:
            close = _closing_fence(lines, block.line - 1, path)
            lines[close + 1:close + 1] = [""] + new
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--update":
        for p in args[1:]:
            update(os.path.abspath(p))
            print(f"updated {p}")
    else:
        for p in args:
            for block, printed in run(os.path.abspath(p), real_weights=os.path.isdir(REAL_WEIGHTS)):
                print(f"--- {p}:{block.line}" + (" (needs weights/gemma-2b)" if printed is None else ""))
                print(printed or "", end="")
