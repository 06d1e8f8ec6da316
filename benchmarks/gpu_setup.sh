#!/usr/bin/env bash
# Install kdcli beside a GPU machine's own torch, offline, without touching torch.
#
# GPU images and clusters pin their torch stack (e.g. torch 2.11, torchvision 0.26, timm, typer,
# rich, safetensors) and often lack pydantic and internet.  `make gpu-wheels`, run on a machine
# with internet, puts pydantic and its pure-Python needs (built for the GPU machine's Python) and
# setuptools (kdcli's build backend) into WHEELS; this script installs those and kdcli itself into
# SITE with --no-deps, so nothing the image has is replaced.  Then: PYTHONPATH=SITE python3 ...
set -euo pipefail
wheels=${1:-.whl}
site=${2:-/tmp/kdcli-site}
python=${PYTHON:-python3}
shopt -s nullglob
runtime_wheels=("$wheels"/pydantic-*.whl "$wheels"/pydantic_core-*.whl "$wheels"/annotated_types-*.whl "$wheels"/typing_*.whl)
if ! "$python" -c "import pydantic" 2>/dev/null && [ ${#runtime_wheels[@]} -eq 0 ]; then
    echo "no pydantic here and no wheels in $wheels: run 'make gpu-wheels' where there is internet" >&2
    exit 1
fi
# Build isolation takes setuptools from the wheels too (--no-index): no download is tried.
"$python" -m pip install --quiet --no-index --find-links "$wheels" --no-deps --no-compile --target "$site" "${runtime_wheels[@]}" .
"$python" -c "import sys; sys.path.insert(0, '$site'); import torch, pydantic, kdcli_plugins; print('kdcli installed in $site beside torch', torch.__version__)"
