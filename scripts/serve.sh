#!/usr/bin/env bash
# bentoml serve with this project's environment; on a machine without NVIDIA GPUs, BentoML's GPU allocator is
# turned off (it would otherwise hand out CUDA_VISIBLE_DEVICES indices that do not exist).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  export BENTOML_DISABLE_GPU_ALLOCATION=1
fi
export BENTOML_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
# Ctrl-C / SIGTERM: running requests get this long to finish (the LLMs' vLLM drains as long: llm.shutdown_timeout_s)
exec .venv/bin/bentoml serve --timeout-graceful-shutdown "${HCX_SHUTDOWN_GRACE_S:-30}" "$@"
