"""Every lesson is also a Jupyter notebook, and the notebook prints what the lesson says.

The notebooks are not kept in the repository: jupytext converts each lessons/NN-*.md into one
(its ```python blocks become code cells, its prose and ```output blocks Markdown cells), and
`notebook()` adds one setup cell in front. The setup cell moves to the repository root, where the
lessons' paths start, and defines the cell magic `%%needs`, which the cells of tagged blocks
(```python peers, ```python real_weights: see tests/test_lessons.py) start with: such a cell runs
only when what it needs is installed, and otherwise prints a note saying what is missing. Cells
inside a <details> answer start folded.

The test executes each notebook in a fresh Jupyter kernel (nbclient) and compares what every code
cell printed with the ```output block of its lesson, as tests/test_lessons.py does for the Markdown.

Writing the notebooks for reading, next to the lessons (so their figures and links resolve):
    .venv/bin/python tests/test_notebooks.py lessons/       # then: jupyter lab lessons/
"""

import os
import sys

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_lessons import (LESSONS, PEER_MODULES, ROOT, lesson_files, missing_needs,  # noqa: E402
                          normalise, parse)

SETUP = '''\
# Setup, added when this notebook was generated from lessons/{name} (tests/test_notebooks.py).
# The lessons run from the repository root; a cell that starts with %%needs runs only when what it
# needs is installed (peers: {peers}; gguf: gguf; real_weights: weights/gemma-2b).
import importlib.util, os
from IPython import get_ipython
from IPython.core.magic import register_cell_magic

while not os.path.exists(os.path.join("minigemma", "model.py")) and os.getcwd() != "/":
    os.chdir("..")
NEEDS = {needs!r}


@register_cell_magic
def needs(line, cell):
    missing = [m for tag in line.split() if tag != "real_weights" for m in NEEDS[tag]
               if importlib.util.find_spec(m) is None]
    if "real_weights" in line.split() and not os.path.isdir("weights/gemma-2b"):
        missing.append("the real weights in weights/gemma-2b")
    if missing:
        print(f"skipped: needs {{' and '.join(missing)}}")
    else:
        exec(compile(cell, "<cell>", "exec"), get_ipython().user_ns)
'''


def notebook(path):
    """The notebook of one lesson: jupytext's conversion, the setup cell, %%needs on tagged cells."""
    name = os.path.basename(path)
    nb = jupytext.read(path, fmt="md")
    blocks = parse(open(path).read(), path)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.source for c in code_cells] == [b.code for b in blocks], \
        f"{name}: jupytext's code cells are not the lesson's ```python blocks"
    inside_answer = False
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            opened, closed = cell.source.count("<details>"), cell.source.count("</details>")
            inside_answer = (inside_answer or opened > closed) and not closed > opened
            continue
        tags = sorted(t for t in cell.metadata if t in (*PEER_MODULES, "real_weights"))
        for t in tags:
            del cell.metadata[t]
        if tags:
            cell.source = f"%%needs {' '.join(tags)}\n{cell.source}"
        if inside_answer:
            cell.metadata["jupyter"] = {"source_hidden": True}
    peers = " ".join(PEER_MODULES["peers"])
    setup = nbformat.v4.new_code_cell(SETUP.format(name=name, peers=peers, needs=PEER_MODULES))
    nb.cells.insert(0, setup)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def printed(cell):
    """What a cell showed: its stdout, and the repr of a last expression (which a lesson run with
    exec would not print, so it must not happen)."""
    text = ""
    for out in cell.get("outputs", []):
        if out.output_type == "stream" and out.name == "stdout":
            text += out.text
        elif out.output_type in ("execute_result", "display_data"):
            text += f"[display: {out.data.get('text/plain', '')}]\n"
    return text


@pytest.mark.parametrize("name", lesson_files())
def test_notebook_prints_what_the_lesson_says(name):
    path = os.path.join(LESSONS, name)
    nb = notebook(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    cells = [c for c in nb.cells if c.cell_type == "code"][1:]  # after the setup cell
    real_weights = os.path.isdir(os.path.join(ROOT, "weights", "gemma-2b"))
    problems, skipped = [], []
    for block, cell in zip(parse(open(path).read(), path), cells):
        text = printed(cell)
        if missing_needs(block, real_weights):
            assert text.startswith("skipped: needs"), f"{name}:{block.line}: printed {text!r}"
            if not block.real_weights:
                skipped.append(block.line)
            continue
        expected = normalise(block.expected) if block.expected is not None else ""
        if normalise(text) != expected:
            problems.append(f"{name}:{block.line}: the notebook cell printed\n{text}\n"
                            f"--- but the lesson says ---\n{expected}\n")
    assert not problems, "\n".join(problems)
    if skipped:  # the other cells matched, but the notebook was not checked in full
        pytest.skip(f"{name}: the cells of lines {skipped} did not run (their peers are absent)")


def test_a_cell_whose_needs_are_absent_prints_a_note(tmp_path, monkeypatch):
    lesson = tmp_path / "99-check.md"
    lesson.write_text("# A lesson\n\n```python peers\nprint(1)\n```\n\n```output\n1\n```\n\n"
                      "## Things to try\n\n<details><summary>Answer</summary>\n\n"
                      "```python\nprint(2)\n```\n\n</details>\n")
    monkeypatch.setitem(PEER_MODULES, "peers", ("no_such_module_here",))
    nb = notebook(str(lesson))
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert cells[1].source.startswith("%%needs peers\n")
    assert printed(cells[1]) == "skipped: needs no_such_module_here\n"
    assert printed(cells[2]) == "2\n" and cells[2].metadata["jupyter"]["source_hidden"]
    assert "source_hidden" not in cells[1].metadata.get("jupyter", {})


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else LESSONS
    os.makedirs(out, exist_ok=True)
    for name in lesson_files():
        target = os.path.join(out, name[:-3] + ".ipynb")
        nbformat.write(notebook(os.path.join(LESSONS, name)), target)
        print(f"wrote {os.path.relpath(target)}")
