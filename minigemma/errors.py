"""What minigemma raises when something goes wrong: one base class, one subclass per area.

Every error minigemma raises on purpose is a MinigemmaError whose message is one sentence naming
the file, tensor or argument at fault and what was expected. Each class also derives from the
built-in exception that code written before it existed catches (ValueError, FileNotFoundError,
OSError, MemoryError), so `except ValueError` keeps working:

    MinigemmaError
    ├── CheckpointError (ValueError)        a checkpoint that cannot be read or used
    │   ├── CheckpointNotFoundError (FileNotFoundError)  its directory, file or a shard missing
    │   ├── SafetensorsError                a .safetensors file or index (formats/safetensors.py)
    │   ├── TorchCheckpointError            a gemma_pytorch .ckpt (formats/pytorch.py)
    │   ├── GGUFError                       a .gguf file (formats/gguf.py)
    │   ├── OrbaxCheckpointError            an Orbax (Flax) checkpoint (formats/flax.py)
    │   ├── CheckpointFormatError           no checkpoint there, or several; a bad config=
    │   └── NonFiniteWeightsError           a NaN or infinity in the weights (check_weights)
    ├── ConfigError (ValueError)            a config.json or GemmaConfig that is not Gemma's
    │   └── ConfigNotFoundError (FileNotFoundError)
    ├── TokenizerError (ValueError)         not a Gemma tokenizer.model, or another vocabulary
    │   └── TokenizerNotFoundError (FileNotFoundError)
    ├── GenerationError (ValueError)        bad arguments: token ids, prompts, sampling, caches
    │   └── ContextFullError                the prompt (or conversation) does not fit the context
    ├── NonFiniteError (FloatingPointError) a forward gave NaN or infinite logits: which layer
    ├── GoldenError (ValueError)            a golden that cannot be read or trusted
    │   ├── GoldenNotFoundError (FileNotFoundError)
    │   └── GoldenWriteError (OSError)      writing failed (a full disk): nothing was written
    ├── ConvertError (ValueError)           a conversion convert.py cannot do as asked
    │   └── ConvertDestinationError (FileNotFoundError)  the destination's directory is missing
    ├── OutputExistsError (FileExistsError) a golden or converted checkpoint already there
    └── InsufficientMemoryError (MemoryError)  refused before allocating: it would not fit

The command line prints any MinigemmaError as one line, `minigemma: error: <message>`, and exits
with 1 (--debug shows the traceback). `check_memory` lives here too: it is the one check that
raises before NumPy would fail (or the kernel would kill the process) for lack of memory.
"""

import reprlib


class MinigemmaError(Exception):
    """The base of every error minigemma raises on purpose."""


# Checkpoints


class CheckpointError(MinigemmaError, ValueError):
    """A checkpoint that cannot be read or does not fit its config; names the file and tensor."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint directory or file, or a shard an index lists, does not exist."""


class SafetensorsError(CheckpointError):
    """A safetensors file or index that cannot be read; the message names the file and tensor."""


class TorchCheckpointError(CheckpointError):
    """A .ckpt file that cannot be read; the message names the file and the tensor or global."""


class GGUFError(CheckpointError):
    """A GGUF file minigemma cannot read; the message names the file and the tensor or key."""


class OrbaxCheckpointError(CheckpointError):
    """An Orbax checkpoint that is not Gemma 1's; the message names the directory and the leaf."""


class CheckpointFormatError(CheckpointError):
    """A path that holds no checkpoint minigemma reads, or a config that cannot be used."""


class NonFiniteWeightsError(CheckpointError):
    """A weight holding NaN or an infinity; the message names the tensor and the first index."""


# Configs and tokenizers


class ConfigError(MinigemmaError, ValueError):
    """A config.json (or GemmaConfig) whose values are missing, invalid or not Gemma's."""


class ConfigNotFoundError(ConfigError, FileNotFoundError):
    """The config.json a checkpoint needs does not exist."""


class TokenizerError(MinigemmaError, ValueError):
    """A tokenizer file that is not a Gemma SentencePiece model, or does not fit the checkpoint."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """The tokenizer file does not exist."""


# Running the model


class GenerationError(MinigemmaError, ValueError):
    """A bad argument to the model or to generation: token ids, a prompt, a sampling setting, a
    cache, a dtype."""


class ContextFullError(GenerationError):
    """The prompt, or the conversation so far, does not fit in the context (the KV cache)."""


class NonFiniteError(MinigemmaError, FloatingPointError):
    """A forward whose logits hold NaN or an infinity; the message names the layer and the point
    where the first non-finite value appeared."""


# Goldens


class GoldenError(MinigemmaError, ValueError):
    """A golden directory that cannot be read, or whose arrays are not what was recorded."""


class GoldenNotFoundError(GoldenError, FileNotFoundError):
    """golden.json or golden.npz is missing, or the prompts file to record."""


class GoldenWriteError(GoldenError, OSError):
    """Writing a golden failed (a full disk, a file size limit); nothing was left at its path."""


# Converting and writing


class ConvertError(MinigemmaError, ValueError):
    """An argument or destination `convert` cannot use; the message names it."""


class ConvertDestinationError(ConvertError, FileNotFoundError):
    """The directory a conversion would write into does not exist."""


class OutputExistsError(MinigemmaError, FileExistsError):
    """A golden or a converted checkpoint is already at the path (--force replaces it)."""


# Memory


class InsufficientMemoryError(MinigemmaError, MemoryError):
    """An allocation refused before it was tried: it needs more memory than is available."""


def available_memory():
    """Bytes of memory available for new allocations (MemAvailable in /proc/meminfo: free memory
    plus the page cache the kernel can reclaim), or None where there is no /proc/meminfo."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(n_bytes, what):
    """Raise InsufficientMemoryError if `what` (e.g. "a KV cache of 8192 positions"), needing
    n_bytes, cannot fit in the memory available. Unknown availability (not Linux) passes, and so
    does anything under 64 MB: not worth reading /proc/meminfo for at every decode step."""
    if n_bytes < 1 << 26:
        return
    available = available_memory()
    if available is not None and n_bytes > available:
        raise InsufficientMemoryError(f"{what} needs {gigabytes(n_bytes)} but only "
                                      f"{gigabytes(available)} of memory is available "
                                      f"(MemAvailable in /proc/meminfo); refused before allocating")


def gigabytes(n_bytes):
    return f"{n_bytes / 1e9:,.2f} GB"


# How a message shows a value read from a damaged file: its repr, cut short (a pickle can nest a
# list in itself thirty times over, whose full repr would never finish).
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 120
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 12
_SHORT.maxlevel = 4


def shown(value):
    """repr(value), bounded in length and depth, for an error message."""
    return _SHORT.repr(value)
