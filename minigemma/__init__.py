"""minigemma: Gemma 1 in plain NumPy, exact enough to be a golden reference."""

from .checkpoint import load
from .config import GemmaConfig, gemma_2b, gemma_7b
from .errors import (CheckpointError, CheckpointFormatError, CheckpointNotFoundError, ConfigError,
                     ConfigNotFoundError, ContextFullError, ConvertDestinationError,
                     ConvertError, GenerationError, GGUFError, GoldenError, GoldenNotFoundError,
                     GoldenWriteError, InsufficientMemoryError, MinigemmaError, NonFiniteError,
                     NonFiniteWeightsError, OrbaxCheckpointError, OutputExistsError,
                     SafetensorsError, TokenizerError, TokenizerNotFoundError,
                     TorchCheckpointError)
from .model import Gemma, KVCache
from .sampling import generate, stream
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["load", "Gemma", "KVCache", "GemmaConfig", "gemma_2b", "gemma_7b", "Tokenizer", "generate",
           "stream", "__version__",
           # errors (errors.py)
           "MinigemmaError", "CheckpointError", "CheckpointNotFoundError", "SafetensorsError",
           "TorchCheckpointError", "GGUFError", "OrbaxCheckpointError", "CheckpointFormatError",
           "NonFiniteWeightsError", "ConfigError", "ConfigNotFoundError", "TokenizerError",
           "TokenizerNotFoundError", "GenerationError", "ContextFullError", "NonFiniteError",
           "GoldenError", "GoldenNotFoundError", "GoldenWriteError", "ConvertError",
           "ConvertDestinationError", "OutputExistsError", "InsufficientMemoryError"]
