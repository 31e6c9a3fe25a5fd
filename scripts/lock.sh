#!/usr/bin/env bash
# Regenerates requirements.lock: every dependency of swarmlm (with the dev extra) pinned, with hashes,
# for CPython 3.11, resolved by uv from pyproject.toml's ranges. torch is left out of the file (its build
# depends on the machine; scripts/install.sh pins it to scripts/torch-version), but its dependencies are
# locked as its CPU build needs them. After regenerating: run the whole suite in a fresh venv
# (`rm -rf .venv && make test`), then move pyproject's upper bounds to what it tested.
#
#   bash scripts/lock.sh                       # torch's CPU build from PyTorch's CPU index
#   TORCH_WHEELS=DIR bash scripts/lock.sh      # ... from a folder of wheels instead (no access to that index)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=$(cat scripts/torch-version)
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$PYTHON" -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q --disable-pip-version-check uv
torch_source=(--torch-backend cpu)
if [ -n "${TORCH_WHEELS:-}" ]; then
    torch_source=(--find-links "$TORCH_WHEELS")
fi
echo "torch==${TORCH_VERSION}" > "$tools/torch.txt"
"$tools/venv/bin/uv" pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
    --constraint "$tools/torch.txt" "${torch_source[@]}" --no-emit-package torch \
    --custom-compile-command "bash scripts/lock.sh" --quiet -o requirements.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) packages pinned"
