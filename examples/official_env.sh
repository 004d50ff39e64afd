#!/usr/bin/env bash
# A Python venv with the OFFICIAL CODiff pins (github.com/jp-guo/CODiff,
# environment.yml), CPU build, for examples/compare_official.py.
#
#     examples/official_env.sh VENV            # e.g. /work/official-venv
#     PYTHON=python3.10 examples/official_env.sh VENV
#
# Pins, as in the official environment.yml: torch 2.0.1 and torchvision 0.15.2
# (the CPU wheels from TORCH_INDEX, default download.pytorch.org/whl/cpu; where
# that index cannot be reached, or TORCH_INDEX is empty, PyPI's, which are the
# CUDA 11.7 build the official environment has and also run on CPU),
# diffusers 0.25.0, peft 0.9.0, transformers 4.37.2, numpy 1.26.3,
# huggingface-hub 0.25.0 (the last with `cached_download`, which diffusers 0.25
# imports), accelerate 1.3.0 (peft 0.9 requires it), safetensors 0.5.2,
# tokenizers 0.15.2, einops 0.8.1 (diffusion/my_utils/vaehook.py), tqdm 4.67.1,
# pillow 11.1.0 and importlib-metadata 8.6.1 (diffusers imports it; newer ones
# pull in more). Those cover what the modules compare_official.py loads import
# (diffusion/codiff.py, diffusion/models/*, diffusion/my_utils/{vaehook,devices,
# wavelet_color_fix}.py, cave/cave.py); the test script's extras (pyiqa, cv2,
# xformers, ...) are not needed. Other dependencies are left to pip.
#
# The official environment uses Python 3.10; PYTHON (default python3) picks the
# interpreter, and every pin has wheels for 3.10 and 3.11.
#
# Idempotent: an existing VENV is reused and only the pins it lacks are installed.
set -euo pipefail

VENV=${1:?usage: $0 VENV}
PYTHON=${PYTHON:-python3}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}

TORCH_PINS=(torch==2.0.1 torchvision==0.15.2)
PYPI_PINS=(
  numpy==1.26.3
  diffusers==0.25.0
  peft==0.9.0
  transformers==4.37.2
  huggingface-hub==0.25.0
  accelerate==1.3.0
  safetensors==0.5.2
  tokenizers==0.15.2
  einops==0.8.1
  tqdm==4.67.1
  pillow==11.1.0
  importlib-metadata==8.6.1
)

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# the pins of "$@" that VENV lacks (a local version label such as +cpu is ignored)
missing() {
  "$PY" - "$@" <<'EOF'
import sys
from importlib import metadata
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have is None or have.split("+")[0] != want:
        print(pin)
EOF
}

mapfile -t need_torch < <(missing "${TORCH_PINS[@]}")
if [ ${#need_torch[@]} -gt 0 ]; then
  # torch and torchvision together, so that the resolver keeps both on one build
  if [ -n "$TORCH_INDEX" ] && echo "installing ${need_torch[*]} from $TORCH_INDEX" &&
     "$PY" -m pip install --disable-pip-version-check --retries 1 --timeout 20 \
       --index-url "$TORCH_INDEX" "${TORCH_PINS[@]}"; then
    :
  else
    # PyPI's Linux torch 2.0.1 is the CUDA 11.7 build (torch + nvidia-*-cu11 +
    # triton, ~2.5 GB), exactly the official environment's; its CPU kernels are
    # the CPU wheel's, and it runs without a GPU
    echo "installing ${need_torch[*]} from PyPI (CUDA 11.7 build; runs on CPU)"
    "$PY" -m pip install --disable-pip-version-check "${TORCH_PINS[@]}"
  fi
fi

mapfile -t need_pypi < <(missing "${PYPI_PINS[@]}")
if [ ${#need_pypi[@]} -gt 0 ]; then
  echo "installing ${need_pypi[*]}"
  # all pins on the command line, so that pip cannot move one to satisfy another
  # (torch 2.0.1+cpu, already there, satisfies torch==2.0.1: pip keeps it)
  "$PY" -m pip install --disable-pip-version-check "${PYPI_PINS[@]}" "${TORCH_PINS[@]}"
fi

left=$(missing "${TORCH_PINS[@]}" "${PYPI_PINS[@]}")
if [ -n "$left" ]; then
  echo "still missing or at another version: $left" >&2
  exit 1
fi
"$PY" -c 'import torch, torchvision, diffusers, peft, transformers, einops; print("ok: torch", torch.__version__, "diffusers", diffusers.__version__, "peft", peft.__version__)'
