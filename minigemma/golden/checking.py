"""Judging a run against a golden: logits and greedy tokens per prompt (compare, check); the
divergence finder (divergence.py) judges activations with the same measure, `errors`.

From another project's tests:

    golden = minigemma.golden.load("GOLDEN")
    logits = {name: my_logits(ids) for name, ids in golden.token_ids().items()}
    minigemma.golden.assert_matches(golden, logits)

    minigemma golden check GOLDEN --weights DIR     re-run minigemma itself and compare

Shape legend: T tokens, V vocab, k top-k width.
"""

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import GoldenError
from .files import input_files, load, sha256_file
from .recording import run_prompt

# ----------------------------------------------------------------------------------------------
# Comparing logits against a golden


def errors(expected, actual):
    """(max |actual - expected|, that / max |expected|): the measure of every golden comparison,
    logits and activations alike. One number per array, insensitive to values near zero."""
    err = float(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64)).max())
    return err, err / max(float(np.abs(expected).max()), 1e-30)



@dataclass
class PromptResult:
    name: str
    n_tokens: int
    max_abs: float          # max |ours - golden| over the stored logits
    max_rel: float          # max_abs / max |golden|: logits near zero make elementwise ratios noise
    passed: bool            # every stored logit within atol + rtol * |golden|
    greedy_compared: bool = False
    first_greedy_diff: int | None = None  # index of the first differing greedy token
    problem: str = ""       # a shape or length mismatch, instead of numbers


@dataclass
class Report:
    atol: float
    rtol: float
    results: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # not tied to one prompt (e.g. weight hashes)

    @property
    def passed(self):
        return not self.problems and all(r.passed for r in self.results)

    def __str__(self):
        lines = [f"{'prompt':<24} {'tokens':>6} {'max|d|':>10} {'max rel':>10} {'greedy':>12}  "
                 f"result"]
        for r in self.results:
            greedy = ("-" if not r.greedy_compared else "same" if r.first_greedy_diff is None
                      else f"differs @{r.first_greedy_diff}")
            if r.problem:
                lines.append(f"{r.name:<24} {r.n_tokens:>6} {'-':>10} {'-':>10} {'-':>12}  "
                             f"FAIL: {r.problem}")
            else:
                lines.append(f"{r.name:<24} {r.n_tokens:>6} {r.max_abs:>10.3g} {r.max_rel:>10.3g} "
                             f"{greedy:>12}  {'pass' if r.passed else 'FAIL'}")
        lines += [f"FAIL: {p}" for p in self.problems]
        n_ok = sum(r.passed for r in self.results)
        lines.append(f"{n_ok}/{len(self.results)} prompts within atol={self.atol:g}, "
                     f"rtol={self.rtol:g}: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


def at_stored_positions(stored, logits):
    """Reduce logits [T, V] to what the golden stores: all of it, or the last row plus the
    logits at the golden's top-k ids of every row. -> {array name: array}"""
    if "logits" in stored:
        return {"logits": logits}
    return {"last_logits": logits[-1],
            "topk_logits": np.take_along_axis(logits, stored["topk_ids"].astype(np.int64), -1)}


def compare_prompt(name, stored, ours, atol, rtol, greedy=None):
    """One PromptResult from the golden's arrays and ours, both reduced by at_stored_positions."""
    T = len(stored["tokens"])
    for key in ours:
        want, got = stored[key].shape, np.shape(ours[key])
        if want != got:
            return PromptResult(name, T, np.inf, np.inf, False,
                                problem=f"{key} has shape {got}, the golden's has {want}")
    expected = np.concatenate([stored[k].ravel() for k in ours]).astype(np.float64)
    actual = np.concatenate([np.asarray(ours[k]).ravel() for k in ours]).astype(np.float64)
    max_abs, max_rel = errors(expected, actual)
    passed = bool(np.all(np.abs(actual - expected) <= atol + rtol * np.abs(expected)))  # NaN fails
    first = None
    if greedy is not None:
        want, got = stored["greedy"], np.asarray(greedy)
        n = min(len(want), len(got))
        diffs = np.flatnonzero(want[:n] != got[:n])
        first = int(diffs[0]) if len(diffs) else (None if len(got) >= len(want) else len(got))
        passed = passed and first is None
    return PromptResult(name, T, max_abs, max_rel, passed, greedy is not None, first)


def compare(golden, logits_by_prompt, *, greedy_by_prompt=None, atol=None, rtol=None):
    """Compare another implementation's logits with a golden -> Report.

    logits_by_prompt: {prompt name: logits [T, V]} for the golden's token ids (golden.token_ids());
    prompts left out are not compared. greedy_by_prompt (optional): {prompt name: greedy token ids}.
    atol, rtol default to the golden's recorded tolerances. Passing means, elementwise,
    |logits - golden| <= atol + rtol * |golden| and, if given, identical greedy tokens.
    """
    atol = golden.tolerances["logits_atol"] if atol is None else atol
    rtol = golden.tolerances["logits_rtol"] if rtol is None else rtol
    report = Report(atol, rtol)
    known = {p["name"] for p in golden.prompts}
    unknown = sorted(set(logits_by_prompt) - known)
    if unknown:
        raise GoldenError(f"{golden.path}: no prompt named {unknown[0]!r} in the golden "
                          f"(it has {', '.join(sorted(known))})")
    for p in golden.prompts:
        if p["name"] not in logits_by_prompt:
            continue
        stored = golden.prompt_arrays(p["name"])
        logits = np.asarray(logits_by_prompt[p["name"]])
        greedy = (greedy_by_prompt or {}).get(p["name"])
        if logits.ndim != 2 or logits.shape[0] != len(stored["tokens"]):
            report.results.append(PromptResult(
                p["name"], len(stored["tokens"]), np.inf, np.inf, False,
                problem=f"logits have shape {logits.shape}, expected [{len(stored['tokens'])}, V] "
                        f"(one row per prompt token; check BOS)"))
            continue
        ours = at_stored_positions(stored, logits)
        report.results.append(compare_prompt(p["name"], stored, ours, atol, rtol, greedy))
    return report


def assert_matches(golden, logits_by_prompt, **kwargs):
    """compare(...) for tests: raises AssertionError with the report table unless it passes."""
    report = compare(golden, logits_by_prompt, **kwargs)
    if not report.results:
        raise AssertionError("no prompt of the golden was compared")
    if not report.passed:
        raise AssertionError(f"logits differ from the golden {golden.path}:\n{report}")
    return report


# ----------------------------------------------------------------------------------------------
# Checking minigemma itself against a golden


def check(path, weights, *, atol=None, rtol=None, progress=None):
    """Re-run the golden's prompts through minigemma on `weights` with the recorded precision
    recipe and compare logits and greedy tokens -> Report (also checks the weight hashes)."""
    from ..checkpoint import load as load_model

    golden = load(path)
    problems = weight_differences(golden, weights)
    for problem in problems:
        warnings.warn(problem, stacklevel=2)  # now, before the prompts run for a while
    precision = golden.meta["precision"]
    model = load_model(weights, dtype=np.dtype(precision["compute_dtype"]),
                       normalizer=precision["normalizer"])
    atol = golden.tolerances["logits_atol"] if atol is None else atol
    rtol = golden.tolerances["logits_rtol"] if rtol is None else rtol
    report = Report(atol, rtol, problems=problems)
    for n, p in enumerate(golden.prompts, 1):
        stored = golden.prompt_arrays(p["name"])
        ours = run_prompt(model, p["token_ids"], len(stored["greedy"]), at_golden_ids(stored))
        compared = {key: ours[key] for key in ("logits", "last_logits", "topk_logits") if key in ours}
        result = compare_prompt(p["name"], stored, compared, atol, rtol, greedy=ours["greedy"])
        report.results.append(result)
        if progress:
            progress(f"[{n}/{len(golden.prompts)}] {p['name']}: max|d| {result.max_abs:.3g} "
                     f"{'pass' if result.passed else 'FAIL'}")
    return report


def weight_differences(golden, weights):
    """One sentence per weight file that is not the one the golden was recorded from, naming the
    file and both sha256 (the tokenizer plays no part: the golden holds the token ids)."""
    local = input_files(weights)
    problems = []
    for name, digest in golden.meta["files"].items():
        if name == "tokenizer.model":
            continue
        if name not in local:
            problems.append(f"{weights}: has no {name}, which the golden {golden.path} was "
                            f"recorded from (sha256 {digest})")
        elif (found := sha256_file(local[name])) != digest:
            problems.append(f"{local[name]} is not the file the golden was recorded from: sha256 "
                            f"differs (the golden {golden.path} has {digest}, this file {found})")
    return problems


def at_golden_ids(stored):
    """run_prompt's reduce for checking: the logits the golden stores, in full or at its top-k ids
    (minigemma's own top-k could order near-ties differently)."""
    def reduce(start, logits):
        if "logits" in stored:
            return {"logits": logits}
        top_ids = stored["topk_ids"][start:start + len(logits)].astype(np.int64)
        return {"topk_logits": np.take_along_axis(logits, top_ids, -1)}
    return reduce
