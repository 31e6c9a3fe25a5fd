#!/usr/bin/env bash
# Runs the exactness smoke (tests marked `canary`) on several transformers releases, each in a fresh venv with
# the newest releases of everything else that pyproject.toml allows beside it (install.sh --latest with
# transformers pinned), and prints a table. Use it before moving pyproject.toml's transformers bounds; the
# whole suite should still run on the lower bound and on the newest.
#
#   bash scripts/transformers-matrix.sh 5.10.4 5.16.1 5.23.0 5.24.0 5.25.0
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: $0 VERSION ..." >&2; exit 2; }
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
results=()
for version in "$@"; do
    echo "[matrix] transformers==$version"
    rm -rf "$work/venv"
    "$PYTHON" -m venv "$work/venv"
    echo "transformers==$version" > "$work/constraints.txt"
    CONSTRAINTS="$work/constraints.txt" PYTHON="$work/venv/bin/python" bash scripts/install.sh --latest
    if "$work/venv/bin/python" -m pytest -q -m canary tests; then outcome=passed; else outcome=FAILED; fi
    hub=$("$work/venv/bin/python" -c 'import huggingface_hub as h; print(h.__version__)')
    results+=("transformers $version (huggingface_hub $hub): $outcome")
done
printf '[matrix] %s\n' "${results[@]}"
! printf '%s\n' "${results[@]}" | grep -q FAILED
