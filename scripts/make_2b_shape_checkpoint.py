"""Write seeded random weights in the exact file layout of the google/gemma-2b (or -7b) repository.

    python scripts/make_2b_shape_checkpoint.py [OUT_DIR] [--seed N] [--shape 2b|7b]

The same as `python -m minigemma.random_checkpoint`, which holds the code (and works from an
installed minigemma too); see its docstring for the files written and the default OUT_DIR.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from minigemma.random_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    main()
