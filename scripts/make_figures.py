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
from minigemma.config import LOCAL  # noqa: E402
from minigemma.gemma3 import visible  # noqa: E402
from minigemma.model import embed, gelu_tanh, rope, rope_frequencies, softmax  # noqa: E402

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


# ----------------------------------------------------------------------------------------------
# Lesson 13: the real Gemma 3 270M (the built-in model, a Q4_K_M GGUF; needs minigemma[demo])


def gemma3_270m():
    """The built-in model and its tokenizer, as lesson 13 loads them."""
    from minigemma.builtin import builtin_model_path
    from minigemma.formats.gguf import tokenizer_model_bytes

    path = builtin_model_path()
    return minigemma.load(path), minigemma.Tokenizer.from_model_bytes(tokenizer_model_bytes(path),
                                                                      source=path)


def gemma3_attention(model, ids, n_layers):
    """[n_layers, N, T, T] attention weights of the first n_layers layers of a Gemma 3 on ids,
    from their q and k after QK-norm and RoPE (K = 1), with each layer's mask (window or not)."""
    c, T = model.config, len(ids)
    kept = {}
    keep = lambda name, value: kept.__setitem__(name, value) if name.endswith(("q_rope", "k_rope")) \
        else None
    positions, cache = np.arange(T), model.new_cache(max_len=T)
    h = embed(ids, model.weights["model.embed_tokens.weight"], model.normalizer, np.float32)
    weights = []
    for i in range(n_layers):
        h = model.block(i, h, positions, cache, keep)
        q, k = kept[f"layers.{i}.q_rope"], kept[f"layers.{i}.k_rope"]     # [T, N, H], [T, 1, H]
        scores = np.einsum("tnh,sh->nts", q, k[:, 0]) * c.query_pre_attn_scalar ** -0.5
        window = c.sliding_window if c.layer_types[i] == LOCAL else None
        weights.append(softmax(np.where(visible(positions, positions, window), scores, -np.inf)))
    return np.array(weights)


def gemma3_norm_weights(out_dir, model):
    """Lesson 13: the real RMSNorm weights (1 + w) of Gemma 3 270M: the median of each of the four
    norms of a block, layer by layer, and the values of every norm of the model."""
    c, W = model.config, model.weights
    norms = [("input_layernorm", "before attention"), ("post_attention_layernorm", "after attention"),
             ("pre_feedforward_layernorm", "before the FFN"), ("post_feedforward_layernorm", "after the FFN")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for n, (name, label) in enumerate(norms):
        scale = np.array([1 + W[f"model.layers.{i}.{name}.weight"] for i in range(c.n_layers)])  # [L, D]
        left.semilogy(np.median(scale, axis=1), marker="o", ms=4, color=f"C{n}", label=label)
        right.hist(scale.ravel(), bins=np.logspace(-2, 3.5, 56), histtype="step", lw=1.5, color=f"C{n}")
    qk = np.array([1 + W[f"model.layers.{i}.self_attn.{p}_norm.weight"] for i in range(c.n_layers)
                   for p in "qk"])
    right.hist(qk.ravel(), bins=np.logspace(-2, 3.5, 56), histtype="step", lw=1.5, color="gray",
               label="QK-norms (H = 256 each)")
    left.axhline(1, color="gray", ls=":", lw=1)
    left.text(5.5, 0.6, "1 + w = 1: w = 0, where training starts", color="gray", fontsize=7)
    left.set_xlabel("layer")
    left.set_ylabel("median of 1 + w over D = 640", fontsize=8)
    left.set_xticks(range(0, c.n_layers, 3))
    left.legend(fontsize=7)
    left.grid(True, which="major", alpha=0.3)
    left.set_title("the four norms of each block", fontsize=9)
    right.set_xscale("log")
    right.set_xlabel("1 + w (values below 0.01, a few negative, not shown)")
    right.set_ylabel("weights, all layers", fontsize=8)
    right.legend(fontsize=7)
    right.set_title("every norm weight of the model", fontsize=9)
    fig.suptitle("Gemma 3 270M: the learned RMSNorm scales (1 + w) are far from 1", fontsize=10)
    fig.tight_layout()
    save(fig, out_dir, "gemma3_norm_weights.png")


def gemma3_sink(out_dir, model, tokenizer):
    """Lesson 13: the real attention weights of every layer of Gemma 3 270M on a 9-token prompt,
    averaged over the 4 heads: the attention sink on <bos>."""
    ids = np.array(tokenizer.encode("The Eiffel Tower is in the city of"))
    weights = gemma3_attention(model, ids, model.config.n_layers).mean(axis=1)     # [L, T, T]
    T, labels = len(ids), [tokenizer.id_to_piece(i).replace("\u2581", " ") for i in ids]
    future = np.triu(np.ones((T, T), bool), k=1)
    fig, axes = plt.subplots(3, 6, figsize=(11, 6.2))
    for i, ax in enumerate(axes.ravel()):
        ax.imshow(np.where(future, np.nan, weights[i]), cmap="viridis", vmin=0, vmax=1)
        kind = "local" if model.config.layer_types[i] == LOCAL else "global"
        ax.set_title(f"layer {i} ({kind})", fontsize=8)
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
        ax.set_xticklabels(labels if i >= 12 else [], rotation=90, fontsize=6)
        ax.set_yticklabels(labels if i % 6 == 0 else [], fontsize=6)
    fig.suptitle("Gemma 3 270M, attention weights (mean of the 4 heads; rows: queries, columns: keys)."
                 " The bright first column is the sink on <bos>", fontsize=9)
    fig.tight_layout()
    save(fig, out_dir, "gemma3_sink.png")


def gemma3_window(out_dir, model, tokenizer):
    """Lesson 13: the real attention weights of a local layer (window 512) and of the first global
    layer of Gemma 3 270M, on a prompt longer than the window, averaged over the heads."""
    ids = np.array(tokenizer.encode(", ".join(str(n) for n in range(1, 161))))
    weights = gemma3_attention(model, ids, 6).mean(axis=1)                         # [6, T, T]
    T = len(ids)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    for ax, i in zip(axes, (4, 5)):
        visible_keys = weights[i] > 0
        image = ax.imshow(np.where(visible_keys, weights[i], np.nan), cmap="viridis",
                          norm=matplotlib.colors.LogNorm(1e-4, 1), interpolation="antialiased")
        kind = f"local, window {model.config.sliding_window}" if model.config.layer_types[i] == LOCAL \
            else "global"
        ax.set_title(f"layer {i} ({kind})", fontsize=9)
        ax.set_xlabel("key position", fontsize=8)
        ax.set_ylabel("query position", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="weight (mean of 4 heads), log scale")
    fig.suptitle(f"Gemma 3 270M on {T} tokens (counting 1 to 160); white: weight exactly 0", fontsize=9)
    save(fig, out_dir, "gemma3_window.png")


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
    model, tokenizer = gemma3_270m()
    gemma3_norm_weights(out_dir, model)
    gemma3_sink(out_dir, model, tokenizer)
    gemma3_window(out_dir, model, tokenizer)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "lessons"))
