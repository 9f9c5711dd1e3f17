"""minigemma: Gemma 1 in plain NumPy, exact enough to be a golden reference."""

from .checkpoint import load
from .config import GemmaConfig, gemma_2b, gemma_7b
from .model import Gemma, KVCache
from .sampling import generate, stream
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["load", "Gemma", "KVCache", "GemmaConfig", "gemma_2b", "gemma_7b", "Tokenizer", "generate",
           "stream", "__version__"]
