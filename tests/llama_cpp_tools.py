"""llama.cpp's own GGUF converter, convert_hf_to_gguf.py, for writing test files.

The converter ships inside llama-cpp-python's source distribution (vendor/llama.cpp), beside the
two packages it imports: its own copy of gguf-py and conversion/ (one module per architecture;
Gemma 1 is conversion/gemma.py, class GemmaModel). `converter()` downloads that sdist once with
pip (pinned below), extracts those three into the cache directory ($MINIGEMMA_CACHE, default
~/.cache/minigemma) and returns the script's path; a file lock keeps parallel test runs from
extracting at the same time. `convert_hf_to_gguf` runs it on a save_pretrained directory.

    python tests/llama_cpp_tools.py HF_DIR OUT.gguf [f32|f16|bf16|q8_0]
"""

import fcntl
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_ROOT = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
WANTED = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")  # what the converter needs
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def cache_dir():
    directory = os.environ.get("MINIGEMMA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "minigemma")
    os.makedirs(directory, exist_ok=True)
    return directory


def converter():
    """Path of convert_hf_to_gguf.py from llama-cpp-python LLAMA_CPP_PYTHON's sdist, extracted
    into the cache directory on first use."""
    root = os.path.join(cache_dir(), f"llama.cpp-{LLAMA_CPP_PYTHON}")
    script = os.path.join(root, "convert_hf_to_gguf.py")
    if os.path.exists(script):
        return script
    with open(os.path.join(cache_dir(), f"llama.cpp-{LLAMA_CPP_PYTHON}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be extracting: wait for it
        if not os.path.exists(script):
            _extract(_download_sdist(), root)
    return script


def _download_sdist():
    """The llama-cpp-python sdist, from pip's download into the cache directory."""
    directory = os.path.join(cache_dir(), "sdist")
    pattern = os.path.join(directory, f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz")
    if not glob.glob(pattern):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                        "-d", directory], check=True)
    return glob.glob(pattern)[0]


def _extract(sdist, root):
    """Extract the converter and the packages it imports into `root`, all or nothing."""
    staging = tempfile.mkdtemp(dir=os.path.dirname(root), prefix=".extracting-")
    try:
        with tarfile.open(sdist) as archive:
            members = []
            for member in archive.getmembers():
                name = member.name[len(SDIST_ROOT):]
                wanted = member.name.startswith(SDIST_ROOT) and name.startswith(WANTED)
                if wanted and member.isfile():
                    member.name = name
                    members.append(member)
            archive.extractall(staging, members=members, filter="data")
        if not os.path.exists(os.path.join(staging, "convert_hf_to_gguf.py")):
            raise RuntimeError(f"{sdist}: has no {SDIST_ROOT}convert_hf_to_gguf.py")
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_hf_to_gguf(model_dir, outfile, outtype="f32", vocab_only=False):
    """Run llama.cpp's converter on a save_pretrained directory (with tokenizer.model inside, so
    that it writes the vocabulary) -> outfile. outtype: f32, f16, bf16 or q8_0."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    command = [sys.executable, converter(), os.fspath(model_dir), "--outtype", outtype,
               "--outfile", f"{outfile}.partial"] + (["--vocab-only"] if vocab_only else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must import its own gguf-py, not ours
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py {model_dir} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    os.replace(f"{outfile}.partial", outfile)
    return outfile


if __name__ == "__main__":
    print(convert_hf_to_gguf(*sys.argv[1:4]))
