#!/usr/bin/env bash
# Runs the exactness smoke (tests marked `canary`) on several transformers releases, one after another in one
# fresh venv (the tested set first, then `pip install transformers==V` with whatever it needs), and prints a
# table. Use it before moving pyproject.toml's transformers bounds; the whole suite should still run on the
# lower bound and on the newest.
#
#   bash scripts/transformers-matrix.sh 5.10.4 5.16.1 5.23.0 5.24.0 5.25.0
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: $0 VERSION ..." >&2; exit 2; }
PYTHON=${PYTHON:-python3}
VENV=${MATRIX_VENV:-$(mktemp -d)/matrix-venv}
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
trap 'rm -rf "$VENV"' EXIT
PYTHON="$VENV/bin/python" bash scripts/install.sh
results=()
for version in "$@"; do
    echo "[matrix] transformers==$version"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "transformers==$version"
    if "$VENV/bin/python" -m pytest -q -m canary tests; then outcome=passed; else outcome=FAILED; fi
    results+=("transformers $version (huggingface_hub $("$VENV/bin/python" -c 'import huggingface_hub as h; print(h.__version__)')): $outcome")
done
printf '[matrix] %s\n' "${results[@]}"
! printf '%s\n' "${results[@]}" | grep -q FAILED
