"""The divergence finder: where along the forward does another implementation leave the golden?

Another implementation dumps its activations for the golden's prompts into an .npz under the
golden's names, "<prompt>/<point>" (optionally "<prompt>/tokens" too). The finder walks the points
in the order data flows (activation_points in model.py) and measures at each one

    rel = max |other - golden| / max |golden|

(one number per point, insensitive to where values cross zero). Float32 rounding keeps rel near
1e-7..1e-5 for a correct implementation; a bug makes it jump by orders of magnitude at the first
point it touches. The first point with rel > tol is named with what to check there.

    minigemma golden diff GOLDEN OTHER.npz
"""

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import GoldenError, GoldenNotFoundError
from ..model import activation_points
from .checking import errors

LABELS = {
    "embed": "embedding x sqrt(D)",
    "attn_norm": "attention RMSNorm",
    "q_rope": "post-rope q",
    "k_rope": "post-rope k",
    "attn_out": "attention output (before o_proj)",
    "resid_attn": "residual after attention",
    "ffn_norm": "FFN RMSNorm",
    "ffn_out": "GeGLU output (after down_proj)",
    "resid_block": "residual after the block",
    "final_norm": "final RMSNorm",
    "logits": "logits",
}

# What to look at when a point is the first to diverge (its inputs still agree).
HINTS = {
    "embed": "check the embedding scale sqrt(D): float32 sqrt, or bfloat16-rounded (45.25 / 55.5) "
             "only if that is the recipe",
    "attn_norm": "check RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + w), with the +1, in float32",
    "q_rope": "check RoPE layout: Gemma pairs dims (i, i + H/2) (half-split), not (2i, 2i+1); "
              "base 10000; positions counted from 0",
    "k_rope": "check RoPE layout: Gemma pairs dims (i, i + H/2) (half-split), not (2i, 2i+1); "
              "base 10000; positions counted from 0",
    "attn_out": "check attention: scale H^-0.5 (1/16 for Gemma, not (D/N)^-0.5), causal mask, "
                "softmax in float32, query head n reads kv head n // (N/K)",
    "resid_attn": "check o_proj and the residual add after attention",
    "ffn_norm": "check the pre-FFN RMSNorm (transformers' post_attention_layernorm): (1 + w)",
    "ffn_out": "check the GeGLU: tanh-approximate GELU (not exact erf) on gate_proj, times "
               "up_proj, then down_proj",
    "resid_block": "check the residual add after the feed-forward",
    "final_norm": "check the final RMSNorm: (1 + w)",
    "logits": "check the output projection: the unscaled, tied embedding table, no soft-cap",
}


def label(point):
    """"layers.0.q_rope" -> "layer 0 / post-rope q"; "embed" -> "embedding x sqrt(D)"."""
    if point.startswith("layers."):
        _, i, name = point.split(".")
        return f"layer {i} / {LABELS[name]}"
    return LABELS[point]


def hint(point):
    return HINTS[point.rsplit(".", 1)[-1]]


@dataclass
class PointError:
    prompt: str
    point: str
    max_abs: float = np.nan
    rel: float = np.nan
    problem: str = ""   # set instead of numbers when the arrays cannot be compared


@dataclass
class DivergenceReport:
    tol: float
    rows: list = field(default_factory=list)       # PointError for every compared point
    first: PointError | None = None                # the first point beyond tol, or None

    @property
    def diagnosis(self):
        if self.first is None:
            return f"no divergence: every point within max rel err {self.tol:g}"
        f = self.first
        if f.problem:
            return f"{f.prompt}: {label(f.point)}: {f.problem}"
        return (f"{f.prompt}: first divergence at {label(f.point)} ({f.point}): max rel err "
                f"{f.rel:.2g} > {self.tol:g} — {hint(f.point)}")

    def __str__(self):
        lines = [f"{'prompt':<16} {'point':<24} {'max|d|':>10} {'max rel':>10}"]
        for r in self.rows:
            mark = "  <-- first divergence" if r is self.first else ""
            if r.problem:
                lines.append(f"{r.prompt:<16} {r.point:<24} {r.problem}{mark}")
            else:
                lines.append(f"{r.prompt:<16} {r.point:<24} {r.max_abs:>10.3g} {r.rel:>10.3g}"
                             f"{mark}")
        lines.append(self.diagnosis)
        return "\n".join(lines)


def compare_point(prompt, point, expected, actual):
    """PointError of one activation. The other array may carry a leading batch axis of 1 or
    flattened heads ([T, N*H] for [T, N, H]): any layout holding the same numbers in the same
    order. A different number of positions is reported as such."""
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        if actual.size != expected.size:
            batched = actual.ndim > expected.ndim or (actual.shape[0] == 1 and actual.ndim > 1)
            T = actual.shape[1] if batched else actual.shape[0]
            if T != expected.shape[0]:
                return PointError(prompt, point, problem=(
                    f"{T} positions, the golden has {expected.shape[0]}: the token sequences "
                    f"differ — check BOS (Gemma prompts start with <bos> = 2)"))
            return PointError(prompt, point, problem=f"shape {actual.shape}, the golden's is "
                                                     f"{expected.shape}")
        actual = actual.reshape(expected.shape)
    return PointError(prompt, point, *errors(expected, actual))


def compare_tokens(prompt, expected, actual):
    """A PointError at "embed" if the other implementation ran different token ids, else None."""
    actual = np.asarray(actual).reshape(-1)
    if actual.shape == expected.shape and np.array_equal(actual, expected):
        return None
    if len(actual) == len(expected) - 1 and np.array_equal(actual, expected[1:]):
        problem = f"token ids lack the golden's first token {int(expected[0])} — check BOS"
    else:
        diff = np.flatnonzero(actual[:len(expected)] != expected[:len(actual)])
        where = f"first difference at position {int(diff[0])}" if len(diff) else "lengths differ"
        problem = (f"token ids differ ({len(actual)} vs the golden's {len(expected)} tokens, "
                   f"{where}) — check BOS and the tokenizer")
    return PointError(prompt, "embed", problem=problem)


def read_dump(path):
    """{name: array} of another implementation's .npz of activations."""
    if not os.path.isfile(path):
        raise GoldenNotFoundError(f"{path}: no such file (expected an .npz of activations named "
                                  f"'<prompt>/<point>')")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except Exception as e:  # numpy and zipfile raise many kinds on a damaged file: one clear line
        raise GoldenError(f"{path}: cannot be read as an .npz of activations "
                          f"({type(e).__name__}: {e})") from None


def diff(golden, other, *, prompt=None, tol=None):
    """Walk every activation point of the golden's prompts -> DivergenceReport.

    golden: a minigemma.golden.Golden recorded with activations; other: an .npz path or a dict
    {"<prompt>/<point>": array}; prompt: only this prompt; tol: max rel err allowed at a point
    (default: the golden's recorded activation_rel).
    """
    if not isinstance(other, dict):
        other = read_dump(other)
    tol = golden.tolerances["activation_rel"] if tol is None else tol
    points = activation_points(golden.meta["model"]["n_layers"])
    prompts = [p["name"] for p in golden.prompts if p["activations"]]
    if prompt is not None:
        if prompt not in prompts:
            raise GoldenError(f"{golden.path}: no activations recorded for prompt {prompt!r} "
                              f"(prompts with activations: {', '.join(prompts) or 'none'})")
        prompts = [prompt]
    prompts = [p for p in prompts if any(k.startswith(p + "/") for k in other)]
    if not prompts:
        recorded = [p["name"] for p in golden.prompts if p["activations"]]
        example = f"{recorded[0]}/embed" if recorded else "<prompt>/embed"
        raise GoldenError(f"no activations of the golden's prompts in the other dump: its arrays "
                          f"must be named '<prompt>/<point>', e.g. '{example}' "
                          f"(prompts recorded with activations: {', '.join(recorded) or 'none'})")

    report = DivergenceReport(tol)
    for name in prompts:
        stored = golden.prompt_arrays(name)
        rows = []
        if f"{name}/tokens" in other:
            mismatch = compare_tokens(name, stored["tokens"], other[f"{name}/tokens"])
            rows += [mismatch] if mismatch else []
        if not rows:
            rows = [compare_point(name, p, stored[p], other[f"{name}/{p}"])
                    for p in points if f"{name}/{p}" in other and p in stored]
        report.rows += rows
        if report.first is None:
            report.first = next((r for r in rows if r.problem or not r.rel <= tol), None)
    return report
