"""Golden outputs: record what minigemma computes on a checkpoint, check it later, and compare any
other Gemma implementation against it.

    files.py       the format: golden.json + golden.npz, read and written all-or-nothing
    recording.py   running prompts through the reference forward, writing a golden
    checking.py    judging logits and greedy tokens against a golden (and re-checking minigemma)
    divergence.py  judging activations: the first point where another implementation leaves it

    minigemma golden record --weights DIR --prompts prompts.jsonl --out GOLDEN [--activations]
    minigemma golden check GOLDEN --weights DIR
    minigemma golden diff GOLDEN OTHER.npz
"""

from .checking import PromptResult, Report, assert_matches, check, compare, errors
from .divergence import DivergenceReport, diff
from ..model import activation_points
from .files import FORMAT, FORMAT_VERSION, Golden, add_array, load
from .recording import (ACTIVATION_TOL, ATOL, FULL_LOGITS_MAX_TOKENS, NEW_TOKENS, RTOL, TOP_K,
                     read_prompts, record)

__all__ = ["load", "Golden", "record", "read_prompts", "compare", "assert_matches", "check",
           "errors", "diff", "activation_points", "Report", "PromptResult", "DivergenceReport", "add_array", "FORMAT",
           "FORMAT_VERSION", "ATOL", "RTOL", "ACTIVATION_TOL", "NEW_TOKENS", "TOP_K",
           "FULL_LOGITS_MAX_TOKENS"]
