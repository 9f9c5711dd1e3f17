"""The KL report: how far another implementation's next-token distributions are from an exact
reference's, the number that says what a quantized or reduced-precision Gemma costs.

llama.cpp's `llama-perplexity --kl-divergence` measures a quantized model against its own float16
run. Here the reference is an independent exact computation (minigemma), and one report holds two
references side by side, because they answer different questions:

    against minigemma on the SAME quantized weights   the implementation's own error (what its
                                                       arithmetic adds: 8-bit activations in the
                                                       quantized dot products, a float16 KV cache)
    against minigemma on the ORIGINAL weights          the quantization's error (plus the above)

Per prompt, and over the positions of all prompts pooled:

    mean / p99 / max KL   KL(reference || peer) = sum_v p_ref(v) (log p_ref(v) - log p_peer(v))
                          of the next-token distributions, in nats, at every position, computed
                          in float64 from log-softmax (as llama.cpp's tool does, KL of the
                          reference from the tested model)
    top-1                 the share of positions where both put the same token first
    max |dlogit|          the largest |peer - reference| over every logit

    python -m minigemma.kl PEER.npz --against "same Q4_K_M weights=REF.npz" \\
                                    --against "original weights=GOLDEN_DIR"

Logits come from a golden directory or any .npz holding "<prompt>/logits" [T, V] (the golden's
layout, as minigemma.llama_cpp_peer writes it). Prompts a golden stores in the top-k form carry no
full distribution and are left out (the report names them). Shape legend: T positions, V vocab.
"""

import argparse
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import GoldenError, GoldenNotFoundError

# ----------------------------------------------------------------------------------------------
# The math: one position at a time, in float64


def log_softmax(logits):
    """log p of every row, in float64 (subtracting the row max first, so exp never overflows).
    [T, V] -> [T, V]"""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(reference, peer):
    """KL(reference || peer) in nats at every position. [T, V], [T, V] -> [T] float64"""
    log_p, log_q = log_softmax(reference), log_softmax(peer)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return np.maximum(kl, 0.0)  # KL >= 0; float64 rounding can leave -1e-17 for equal rows


@dataclass
class KLStats:
    positions: int
    mean: float          # mean KL over the positions, nats
    p99: float           # 99th percentile (linear interpolation, as numpy.percentile)
    max: float
    top1: float          # share of positions where the argmax tokens agree, 0..1
    max_dlogit: float    # max |peer - reference| over all logits


def summarize(kl, same_top1, max_dlogit):
    """KLStats from per-position KL [T] and top-1 agreement [T] (bool)."""
    return KLStats(len(kl), float(np.mean(kl)), float(np.percentile(kl, 99)), float(np.max(kl)),
                   float(np.mean(same_top1)), float(max_dlogit))


def position_stats(reference, peer, rows=32):
    """Per-position KL [T], per-position top-1 agreement [T] and max |dlogit| of one prompt,
    `rows` positions at a time (at V = 256000 a [32, V] float64 array is 66 MB)."""
    kl, same_top1, max_dlogit = [], [], 0.0
    for start in range(0, len(reference), rows):
        ref = np.asarray(reference[start:start + rows], np.float64)
        other = np.asarray(peer[start:start + rows], np.float64)
        kl.append(kl_divergence(ref, other))
        same_top1.append(np.argmax(ref, axis=-1) == np.argmax(other, axis=-1))
        max_dlogit = max(max_dlogit, float(np.max(np.abs(other - ref))))
    return np.concatenate(kl), np.concatenate(same_top1), max_dlogit


# ----------------------------------------------------------------------------------------------
# Tables: every prompt two implementations share, and all their positions pooled


@dataclass
class KLTable:
    rows: list                                    # [(prompt name, KLStats)] in reference order
    overall: KLStats                              # over the positions of every row pooled
    left_out: list = field(default_factory=list)  # prompts not in both logits sets


def compare(reference, peer):
    """KLTable of a peer against a reference: {prompt: logits [T, V]} each; every prompt in both
    is compared, the rest is listed in left_out."""
    shared = [name for name in reference if name in peer]
    if not shared:
        raise GoldenError(f"no prompt has logits on both sides (reference: "
                         f"{', '.join(reference) or 'none'}; peer: {', '.join(peer) or 'none'})")
    rows, pooled = [], []
    for name in shared:
        ref, other = np.asarray(reference[name]), np.asarray(peer[name])
        if ref.ndim != 2 or ref.shape != other.shape:
            raise GoldenError(f"prompt {name!r}: peer logits have shape {other.shape}, the "
                              f"reference's {ref.shape} (expected the same [T, V])")
        kl, same_top1, max_dlogit = position_stats(ref, other)
        rows.append((name, summarize(kl, same_top1, max_dlogit)))
        pooled.append((kl, same_top1, max_dlogit))
    overall = summarize(np.concatenate([p[0] for p in pooled]),
                        np.concatenate([p[1] for p in pooled]), max(p[2] for p in pooled))
    left_out = sorted(set(reference) ^ set(peer))
    return KLTable(rows, overall, left_out)


@dataclass
class KLReport:
    title: str
    tables: dict   # {label of the reference: KLTable}, in the order they are printed

    def __str__(self):
        names = list(dict.fromkeys(name for t in self.tables.values() for name, _ in t.rows))
        rows = []
        for name in names + ["all"]:
            for label, table in self.tables.items():
                stats = table.overall if name == "all" else dict(table.rows).get(name)
                if stats is not None:
                    rows.append((name, label, stats))
        notes = [f"not compared against {label}: {', '.join(table.left_out)} (no full logits "
                 f"on one side)" for label, table in self.tables.items() if table.left_out]
        return format_table(self.title, "prompt", rows, notes)


def report(peer, references, title="KL divergence"):
    """KLReport of one peer's logits against each reference: {label: {prompt: logits [T, V]}}."""
    return KLReport(title, {label: compare(ref, peer) for label, ref in references.items()})


def summary(reports, title="KL divergence, all positions"):
    """One table of several peers' reports ({peer label: KLReport}), pooled rows only."""
    rows = [(peer, label, table.overall) for peer, r in reports.items()
            for label, table in r.tables.items()]
    return format_table(title, "peer", rows)


def format_table(title, first_column, rows, notes=()):
    """The printed table of [(name, reference label, KLStats)]; a name is shown on its first
    row only."""
    width = max(len(label) for _, label, _ in rows)
    header = (f"{first_column:<16} {'against':<{width}} {'positions':>9} {'mean KL':>9} "
              f"{'p99 KL':>9} {'max KL':>9} {'top-1':>7} {'max|dlogit|':>11}")
    lines = [title, header, "-" * len(header)]
    for i, (name, label, s) in enumerate(rows):
        shown = name if i == 0 or rows[i - 1][0] != name else ""
        lines.append(f"{shown:<16} {label:<{width}} {s.positions:>9} {s.mean:>9.3g} "
                     f"{s.p99:>9.3g} {s.max:>9.3g} {100 * s.top1:>6.1f}% {s.max_dlogit:>11.3g}")
    lines += notes
    lines.append("KL in nats, KL(reference || peer) of the next-token distributions; "
                 "top-1: positions where both rank the same token first")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Files: a golden directory or an .npz in the golden's layout


def npz_path(path):
    """golden.npz inside a golden directory, or the .npz itself."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "golden.npz")
    if not os.path.isfile(path):
        raise GoldenNotFoundError(f"{path}: not found (expected a golden directory or an .npz "
                                  f"of '<prompt>/logits' arrays)")
    return path


def read_arrays(path, array):
    """{prompt: the array "<prompt>/<array>"} of a golden directory or .npz."""
    suffix = "/" + array
    with np.load(npz_path(path), allow_pickle=False) as npz:
        return {name[:-len(suffix)]: npz[name] for name in npz.files if name.endswith(suffix)}


def read_logits(path):
    """{prompt: logits [T, V]} of every prompt stored with full logits."""
    logits = read_arrays(path, "logits")
    if not logits:
        raise GoldenError(f"{npz_path(path)}: no '<prompt>/logits' array (a golden stores full "
                          f"logits only for prompts up to full_logits_max_tokens tokens)")
    return logits


def read_greedy(path):
    """{prompt: greedy continuation [n]}."""
    return read_arrays(path, "greedy")


# ----------------------------------------------------------------------------------------------
# Command line: `python -m minigemma.kl` (add_arguments + run, for `minigemma golden kl` too)


def parse_reference(text):
    """"LABEL=PATH" -> (label, path); a bare PATH is labelled with its own name."""
    label, sep, path = text.partition("=")
    if not sep:
        label, path = os.path.basename(os.path.normpath(text)), text
    if not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, path


def add_arguments(parser):
    parser.add_argument("peer", help=".npz of the peer's logits ('<prompt>/logits' [T, V])")
    parser.add_argument("--against", action="append", type=parse_reference, required=True,
                        metavar="LABEL=PATH", help="a reference: golden directory or .npz of "
                        "logits; repeat for a second (e.g. same and original weights)")


def run(args):
    peer = read_logits(args.peer)
    references = {label: read_logits(path) for label, path in args.against}
    print(report(peer, references, title=f"KL divergence of {args.peer}"))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minigemma.kl",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
