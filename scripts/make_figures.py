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
from minigemma import gemma_2b, gemma_7b  # noqa: E402
from minigemma.model import gelu_tanh, rope, rope_frequencies, softmax  # noqa: E402

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


def rope_rotation(out_dir):
    """Lesson 4: one pair (feature i, feature i + H/2) of a head rotated by RoPE at positions 0..12,
    for a fast pair (1 radian per token) and a slow one (0.1 radian per token)."""
    H, positions = 256, np.arange(13)
    inv_freq = rope_frequencies(H, 10000.0, np.float64)                # [H/2]
    x = np.zeros((len(positions), 1, H))
    x[:, 0, :H // 2] = 1.0                                           # every pair starts at (1, 0)
    rotated = rope(x, positions, 10000.0)[:, 0]                       # [T, H]
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.6))
    for ax, i in zip(axes, (0, 32)):
        circle = np.linspace(0, 2 * np.pi, 200)
        ax.plot(np.cos(circle), np.sin(circle), color="lightgray", lw=1)
        a, b = rotated[:, i], rotated[:, i + H // 2]                 # the pair's two features
        ax.plot(a, b, "o", color="C0", ms=5)
        for p in positions:
            ax.annotate(str(p), (a[p], b[p]), textcoords="offset points", xytext=(5 * a[p], 5 * b[p]),
                        ha="center", va="center", fontsize=7)
        ax.annotate("", (a[1], b[1]), (0, 0), arrowprops=dict(arrowstyle="->", color="C1"))
        ax.set_aspect("equal")
        ax.set_xlim(-1.35, 1.35)
        ax.set_ylim(-1.35, 1.35)
        ax.set_xlabel(f"feature {i}", fontsize=8)
        ax.set_ylabel(f"feature {i + H // 2}", fontsize=8)
        ax.set_title(f"pair {i}: {inv_freq[i]:.2g} radian per token", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("RoPE rotates each pair by position × inv_freq (H = 256; labels: positions)",
                 fontsize=9)
    save(fig, out_dir, "rope_rotation.png")


def rope_pairing(out_dir):
    """Lesson 4: which features RoPE rotates together, in a head of H = 8: Gemma's half-split
    pairs (i, i + H/2) and the interleaved pairs (2i, 2i + 1) of other models."""
    H = 8
    layouts = [("Gemma: half-split pairs (i, i + H/2)", [(i, i + H // 2) for i in range(H // 2)]),
               ("not Gemma: interleaved pairs (2i, 2i + 1)", [(2 * i, 2 * i + 1) for i in range(H // 2)])]
    fig, axes = plt.subplots(2, 1, figsize=(6, 3.4))
    fig.subplots_adjust(hspace=0.45)
    for ax, (title, pairs) in zip(axes, layouts):
        for f in range(H):
            pair = next(n for n, p in enumerate(pairs) if f in p)
            ax.add_patch(plt.Rectangle((f, 0), 0.9, 0.9, color=f"C{pair}", alpha=0.35))
            ax.text(f + 0.45, 0.45, str(f), ha="center", va="center", fontsize=9)
        for n, (a, b) in enumerate(pairs):  # a bracket over each pair, nested ones higher
            top = 1.15 + (0.25 * n if b - a > 1 else 0)
            ax.plot([a + 0.45, a + 0.45, b + 0.45, b + 0.45], [0.95, top, top, 0.95],
                    color=f"C{n}", lw=1.5)
        ax.set_xlim(-0.2, H + 0.1)
        ax.set_ylim(-0.1, 2.1)
        ax.axis("off")
        ax.set_title(title, fontsize=9)
    fig.suptitle("the 8 features of a head; a colour = one rotated pair", fontsize=9, y=1.04)
    save(fig, out_dir, "rope_pairing.png")


def attention_heads(out_dir):
    """Lesson 5: which key/value head each query head reads, query head n -> kv head n // (N/K):
    2B (multi-query, N = 8, K = 1) and 7B (multi-head, N = K = 16)."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, (name, c) in zip(axes, [("2B: multi-query, 8 query heads, 1 kv head", gemma_2b()),
                                     ("7B: multi-head, 16 query heads, 16 kv heads", gemma_7b())]):
        N, K = c.n_heads, c.n_kv_heads
        q_x, kv_x = np.linspace(0, 1, N), (np.linspace(0, 1, K) if K > 1 else np.array([0.5]))
        for n in range(N):
            g = n // (N // K)
            ax.plot([q_x[n], kv_x[g]], [1, 0], color="gray", lw=0.8)
        ax.plot(q_x, np.ones(N), "s", ms=9 if N < 10 else 6, color="C0", label="query heads (N)")
        ax.plot(kv_x, np.zeros(K), "o", ms=11 if K == 1 else 6, color="C1", label="key/value heads (K)")
        ax.text(-0.02, 1.12, f"q: N = {N}", fontsize=8)
        ax.text(-0.02, -0.2, f"k, v: K = {K}", fontsize=8)
        ax.set_xlim(-0.08, 1.08)
        ax.set_ylim(-0.35, 1.3)
        ax.axis("off")
        ax.set_title(name, fontsize=9)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.06))
    fig.suptitle("query head n reads key/value head n // (N / K)", fontsize=9, y=1.04)
    save(fig, out_dir, "attention_heads.png")


def residual_growth(out_dir):
    """Lesson 3: the size (rms over D) of the residual stream after each sub-layer of the tiny
    model, at every position of a 24-token prompt, next to the size of each norm's output."""
    model = minigemma.load(TINY)
    ids = np.concatenate([[2], np.random.default_rng(0).integers(3, 512, size=23)])  # T = 24
    record = {}
    model.forward(ids, record=record)
    points = ["embed"] + [f"layers.{i}.{p}" for i in range(model.config.n_layers)
                          for p in ("resid_attn", "resid_block")]
    labels = ["embedding"] + [f"layer {i}\n+ {what}" for i in range(model.config.n_layers)
                              for what in ("attention", "feed-forward")]
    rms = np.array([np.sqrt(np.mean(record[p] ** 2, axis=-1)) for p in points])   # [points, T]
    norms = [f"layers.{i}.{p}" for i in range(model.config.n_layers) for p in ("attn_norm", "ffn_norm")]
    norm_rms = np.array([np.sqrt(np.mean(record[p] ** 2, axis=-1)) for p in norms])
    fig, ax = plt.subplots(figsize=(6, 3.4))
    x = np.arange(len(points))
    ax.plot(x, rms, color="C0", alpha=0.25, lw=1)
    ax.plot(x, rms.mean(axis=1), color="C0", lw=2.5, marker="o", label="residual stream h (each line: a position)")
    ax.plot(x[:-1] + 0.5, norm_rms.mean(axis=1), color="C1", lw=0, marker="s",
            label="a norm's output, feeding the next sub-layer (mean)")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("rms over the D features")
    ax.set_ylim(0, None)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, alpha=0.3)
    ax.set_title("tiny random model: each sub-layer adds to h; the norms do not shrink it", fontsize=9)
    save(fig, out_dir, "residual_growth.png")


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
    """Lesson 12a: a roofline for an illustrative CPU (50 GB/s memory, 500 GFLOP/s float32), with
    the arithmetic intensity of Gemma's matrix products for T tokens at once over bf16 weights."""
    intensity = np.logspace(-1.5, 3, 200)                            # flop per byte of weights
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.loglog(intensity, np.minimum(peak, bandwidth * intensity) / 1e9, color="k", lw=2)
    # (T, label, where the label goes in points from the dot, alignment)
    for T, label, shift, align in [(1, "decode, 1 token", (8, -4), "left"),
                                   (16, "prefill, 16 tokens", (0, 18), "center"),
                                   (512, "prefill, 512 tokens", (0, -10), "center")]:
        i = T  # per token, 2 flops (multiply, add) per weight; each bf16 weight is 2 bytes read once
        ax.plot([i], [min(peak, bandwidth * i) / 1e9], "o", ms=7)
        ax.annotate(label, (i, min(peak, bandwidth * i) / 1e9), textcoords="offset points",
                    xytext=shift, fontsize=8, ha=align, va="top")
    ax.axvline(peak / bandwidth, color="gray", ls=":", lw=1)
    ax.text(peak / bandwidth * 1.15, 2, "ridge: 10 flop/byte", color="gray", fontsize=7)
    ax.set_xlabel("arithmetic intensity (flop per byte read)")
    ax.set_ylabel("attainable GFLOP/s")
    ax.set_ylim(1, 2000)
    ax.set_title("roofline of an illustrative CPU: 50 GB/s, 500 GFLOP/s", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    save(fig, out_dir, "roofline.png")


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    residual_growth(out_dir)
    rope_wavelengths(out_dir)
    rope_rotation(out_dir)
    rope_pairing(out_dir)
    attention_heads(out_dir)
    attention_pattern(out_dir)
    gelu(out_dir)
    roofline(out_dir)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "lessons"))
