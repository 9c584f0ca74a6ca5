#!/usr/bin/env bash
# Create ./.venv (if missing) and install clipground with its test extras into it.
# Idempotent: re-running only re-checks the install. Works offline except for pip's registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.12 python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "error: clipground needs Python >= 3.11" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import clipground, torch, torchvision, transformers, cv2; cv2.ximgproc" \
  || { echo "error: installation incomplete" >&2; exit 1; }
