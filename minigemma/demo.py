"""The no-download demo: greedy continuation on the tiny seeded checkpoint bundled in examples/."""

import os

import numpy as np

from . import load

TINY = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "tiny-gemma")


def main():
    model = load(TINY)
    prompt = np.array([2, 17, 42, 99])
    cache = model.new_cache(len(prompt) + 16)
    logits = model.forward(prompt, cache, last_only=True)
    out = []
    for _ in range(16):
        out.append(int(np.argmax(logits[-1])))
        logits = model.forward([out[-1]], cache)
    print(f"tiny random Gemma ({TINY}): prompt ids {prompt.tolist()}")
    print(f"greedy continuation ids: {out}")


if __name__ == "__main__":
    main()
