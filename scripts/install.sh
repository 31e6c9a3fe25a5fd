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
echo "[install] installing swarmlm and its dependencies"
"$PYTHON" -m pip install -q --progress-bar off -e ".[dev]"

# The health page test drives a real headless browser: install Debian's chromium where none is found.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
        || command -v google-chrome >/dev/null 2>&1; then
    echo "[install] chromium found (used by the health page test)"
elif command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO="sudo"
        else
            echo "[install] WARNING: not root and no sudo: cannot apt-get install chromium;" \
                 "install it yourself or the health page test will fail"
        fi
    fi
    if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
        echo "[install] installing chromium with apt-get (headless browser for the health page test)"
        $SUDO apt-get update -qq \
            && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
            || echo "[install] WARNING: apt-get could not install chromium; the health page test will fail until it is installed"
    fi
else
    echo "[install] WARNING: no chromium and no apt-get on this machine: install chromium (or Chrome) yourself," \
         "or the health page test will fail"
fi
