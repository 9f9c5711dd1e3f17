#!/usr/bin/env bash
# Build .venv-flax from nothing: the official JAX/Flax Gemma code (gemma-llm 1.0.0) and Orbax,
# pinned in requirements-flax.txt. tests/test_flax.py runs scripts/flax_peer.py with its python.
#
#     bash scripts/setup_flax_venv.sh            # PYTHON=python3.11 picks the interpreter
#
# It needs Python 3.10-3.12 (jaxlib 0.4.23 has wheels for no other) and pip; nothing else.
# Running it again does nothing while the venv matches requirements-flax.txt.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv-flax
REQUIREMENTS=requirements-flax.txt
STAMP="$VENV/requirements-flax.sha256"
PYTHON="${PYTHON:-python3}"

wanted="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$wanted" ]; then
    echo "$VENV is up to date with $REQUIREMENTS"
    exit 0
fi

version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$version" in
    3.10|3.11|3.12) ;;
    *) echo "setup_flax_venv.sh: $PYTHON is Python $version; the pinned jaxlib 0.4.23 needs" \
            "3.10-3.12: set PYTHON=python3.11 (or 3.10, 3.12)" >&2
       exit 1 ;;
esac

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -r "$REQUIREMENTS"
"$VENV/bin/python" -c 'import gemma.params, gemma.transformer, orbax.checkpoint'
echo "$wanted" > "$STAMP"
echo "built $VENV with Python $version: gemma-llm 1.0.0, jax 0.4.23, flax 0.7.5"
