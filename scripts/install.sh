#!/usr/bin/env bash
# Create .venv and install icu-forecast with its dev tools. torch goes first: the pinned
# 2.13.0 resolves to the local CPU build; any other spec would pull gigabytes of CUDA wheels.
# Then the Debian packages the tests need, when missing (scripts/system-packages.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
echo "installed: $(.venv/bin/icu-forecast --help >/dev/null && echo icu-forecast OK)"
# What the test suite drives besides Python (chromium for the browser test, docker-compose).
bash scripts/system-packages.sh
