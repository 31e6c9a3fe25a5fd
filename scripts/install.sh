#!/usr/bin/env bash
# Installs swarmlm and its dependencies into the current Python environment.
# Picks torch's CPU build where no NVIDIA GPU is present, so a CPU machine does not pull
# several GB of CUDA wheels; on a GPU machine the default (CUDA) build is used.
set -euo pipefail
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[install] NVIDIA GPU found: installing torch==${TORCH_VERSION} (CUDA build)"
        "$PYTHON" -m pip install "torch==${TORCH_VERSION}"
    else
        echo "[install] no GPU found: installing torch==${TORCH_VERSION} (CPU build)"
        "$PYTHON" -m pip install "torch==${TORCH_VERSION}" \
            || "$PYTHON" -m pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
    fi
else
    echo "[install] torch $("$PYTHON" -c 'import torch; print(torch.__version__)') already installed"
fi
"$PYTHON" -m pip install -e ".[dev]"
