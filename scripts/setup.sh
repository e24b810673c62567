#!/usr/bin/env bash
# Creates .venv with Python 3.12 (LeRobot 0.6 needs >= 3.12) and installs lerobot-ript with the MetaWorld
# simulator and the test tools. Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  if PYENV_VERSION=3.12.1 python3.12 --version >/dev/null 2>&1; then
    PYENV_VERSION=3.12.1 python3.12 -m venv .venv
  elif command -v python3.12 >/dev/null 2>&1; then
    python3.12 -m venv .venv
  else
    echo "Python 3.12 is required (LeRobot 0.6 needs >= 3.12). Install it, e.g. 'pyenv install 3.12.1'." >&2
    exit 1
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[metaworld,vla,dev]"
# torchcodec (pulled in by lerobot[dataset]) needs system FFmpeg libraries this machine does not have;
# LeRobot then prints a long traceback on every dataset open and falls back to pyav. We use pyav directly.
.venv/bin/python -m pip uninstall -q -y torchcodec 2>/dev/null || true
.venv/bin/python -c "import lerobot_ript, metaworld; print('lerobot-ript installed in .venv')"
