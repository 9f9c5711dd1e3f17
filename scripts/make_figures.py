"""Draw the figures of the lessons from minigemma's own functions, as small PNGs.

    python scripts/make_figures.py [OUT_DIR]      (default: lessons/)

Needs matplotlib (pip install -e ".[lessons]"); minigemma itself does not. tests/test_lessons.py
runs this script into a temporary directory, so a figure cannot silently go stale or break.
"""

import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)
import minigemma  # noqa: E402
from minigemma.model import gelu_tanh, rope_frequencies, softmax  # noqa: E402

TINY = os.path.join(ROOT, "examples", "tiny-gemma")
DPI = 100


def save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {os.path.relpath(path)}")


def rope_wavelengths(out_dir):
    """Lesson 4: how many tokens each of the 128 rotation pairs of a 256-wide head takes to turn once."""
    inv_freq = rope_frequencies(256, 10000.0, np.float64)            # [H/2]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.semilogy(np.arange(len(inv_freq)), 2 * np.pi / inv_freq, lw=2)
    ax.axhline(8192, color="gray", ls="--", lw=1)
    ax.text(2, 8192 * 1.3, "8192 positions (Gemma's context)", color="gray", fontsize=8)
    ax.set_xlabel("pair i (features i and i + 128)")
    ax.set_ylabel("wavelength 2π / inv_freq[i] (tokens)")
    ax.set_title("RoPE: one rotation speed per pair, base 10000, H = 256", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    save(fig, out_dir, "rope_frequencies.png")


def attention_pattern(out_dir):
    """Lesson 5: causal attention weights of the tiny model, layer 0, every query head."""
    model = minigemma.load(TINY)
    ids = np.concatenate([[2], np.random.default_rng(0).integers(3, 512, size=23)])  # T = 24
    record = {}
    model.forward(ids, record=record)
    q, k = record["layers.0.q_rope"], record["layers.0.k_rope"]      # [T, N, H], [T, K, H]
    T, N, H = q.shape
    group = N // k.shape[1]
    fig, axes = plt.subplots(1, N, figsize=(2.2 * N, 2.6))
    for n, ax in enumerate(axes):
        scores = q[:, n] @ k[:, n // group].T / math.sqrt(H)          # [T, T]
        future = np.triu(np.ones((T, T), bool), k=1)
        probs = softmax(np.where(future, -np.inf, scores))
        ax.imshow(np.where(future, np.nan, probs), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"head {n}", fontsize=9)
        ax.set_xlabel("key position", fontsize=8)
        ax.set_xticks([0, T - 1])
        ax.set_yticks([0, T - 1])
        if n == 0:
            ax.set_ylabel("query position", fontsize=8)
    fig.suptitle("attention weights, tiny random model, layer 0 (white: masked future)", fontsize=9)
    save(fig, out_dir, "attention_pattern.png")


def gelu(out_dir):
    """Lesson 6: the tanh GELU Gemma was trained with, the exact erf GELU, and their difference."""
    x = np.linspace(-5, 5, 2001)
    exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    left.plot(x, gelu_tanh(x), lw=2, label="gelu_tanh (Gemma)")
    left.plot(x, exact, lw=1, ls="--", label="exact erf GELU")
    left.set_xlabel("x")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    left.set_title("the two GELUs look identical", fontsize=10)
    right.plot(x, gelu_tanh(x) - exact, color="C3", lw=1.5)
    right.set_xlabel("x")
    right.set_title("gelu_tanh − exact: up to 4.7e-4", fontsize=10)
    right.grid(alpha=0.3)
    save(fig, out_dir, "gelu.png")


def roofline(out_dir, bandwidth=50e9, peak=500e9):
    """Lesson 12: a roofline for an illustrative CPU (50 GB/s memory, 500 GFLOP/s float32), with
    the arithmetic intensity of Gemma's matrix products for T tokens at once over bf16 weights."""
    intensity = np.logspace(-1.5, 3, 200)                            # flop per byte of weights
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.loglog(intensity, np.minimum(peak, bandwidth * intensity) / 1e9, color="k", lw=2)
    for T, label, shift in [(1, "decode, 1 token", (6, -12)), (16, "prefill, 16 tokens", (6, -12)),
                            (512, "prefill, 512 tokens", (-60, -16))]:
        i = T  # per token, 2 flops (multiply, add) per weight; each bf16 weight is 2 bytes read once
        ax.plot([i], [min(peak, bandwidth * i) / 1e9], "o", ms=7)
        ax.annotate(label, (i, min(peak, bandwidth * i) / 1e9), textcoords="offset points",
                    xytext=shift, fontsize=8)
    ax.axvline(peak / bandwidth, color="gray", ls=":", lw=1)
    ax.set_xlabel("arithmetic intensity (flop per byte read)")
    ax.set_ylabel("attainable GFLOP/s")
    ax.set_title("roofline of an illustrative CPU: 50 GB/s, 500 GFLOP/s", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    save(fig, out_dir, "roofline.png")


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    rope_wavelengths(out_dir)
    attention_pattern(out_dir)
    gelu(out_dir)
    roofline(out_dir)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "lessons"))
