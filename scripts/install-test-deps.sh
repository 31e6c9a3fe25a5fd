#!/usr/bin/env bash
# What the test suite needs beyond Python packages (run by `make test`, not by `make demo`): a headless
# Chromium for the health page test. Installs Debian's chromium with apt-get where none is found.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
        || command -v google-chrome >/dev/null 2>&1; then
    echo "[test-deps] chromium found (used by the health page test)"
elif command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO="sudo"
        else
            echo "[test-deps] WARNING: not root and no sudo: cannot apt-get install chromium;" \
                 "install it yourself or the health page test will fail"
        fi
    fi
    if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
        echo "[test-deps] installing chromium with apt-get (headless browser for the health page test)"
        $SUDO apt-get update -qq \
            && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
            || echo "[test-deps] WARNING: apt-get could not install chromium; the health page test will fail until it is installed"
    fi
else
    echo "[test-deps] WARNING: no chromium and no apt-get on this machine: install chromium (or Chrome) yourself," \
         "or the health page test will fail"
fi
