#!/usr/bin/env bash
# Prepare a ComfyUI checkout for the integration suite (installs ComfyUI's requirements into the venv
# without changing torch/torchvision or this package's pinned libraries). ComfyUI's code is NOT part of
# this repository: it is taken from a git directory or an existing folder outside it.
#
# Usage: tests/integration/setup_comfyui.sh DEST [COMFYUI_GIT_DIR] [VENV]
#   DEST             folder with ComfyUI (created from COMFYUI_GIT_DIR if it has no main.py yet)
#   COMFYUI_GIT_DIR  e.g. /work/.mirror/Comfy-Org+ComfyUI/repo (exported with comfyui-export)
#   VENV             default /work/venv
# Then: COMFYUI_DIR=DEST VENV/bin/python -m pytest tests/integration -v
set -euo pipefail
dest=${1:?usage: setup_comfyui.sh DEST [COMFYUI_GIT_DIR] [VENV]}
gitdir=${2:-}
venv=${3:-/work/venv}
export_tool=${COMFYUI_EXPORT_TOOL:-/work/shared/tools/comfyui-export}

if [ ! -f "$dest/main.py" ]; then
  [ -n "$gitdir" ] || { echo "no $dest/main.py and no COMFYUI_GIT_DIR given" >&2; exit 2; }
  if [ -x "$export_tool" ]; then
    "$export_tool" "$gitdir" "$dest"
  else
    mkdir -p "$dest" && git --git-dir="$gitdir" archive HEAD | tar -x -C "$dest"
  fi
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# pin everything installed now (torch 2.14.1, transformers, diffusers, peft, accelerate, safetensors, numpy...)
"$venv/bin/pip" freeze | grep -v -e '^#' -e '^-e' > "$tmp/constraints.txt"
grep -v -x -E 'torch|torchvision|torchaudio' "$dest/requirements.txt" > "$tmp/req.txt"
"$venv/bin/pip" install -r "$tmp/req.txt" -c "$tmp/constraints.txt"
"$venv/bin/python" -c "import torchvision" 2>/dev/null \
  || "$venv/bin/pip" install torchvision==0.29.1 -c "$tmp/constraints.txt"
"$venv/bin/python" -c "import torchaudio" 2>/dev/null \
  || "$venv/bin/pip" install torchaudio -c "$tmp/constraints.txt" \
  || echo "torchaudio not installed (optional; ComfyUI runs without it)" >&2

# smoke test: start and exit (writes nothing into the repo; uses a throwaway base directory)
base=$(mktemp -d); mkdir -p "$base/custom_nodes"
(cd "$dest" && "$venv/bin/python" main.py --cpu --quick-test-for-ci --base-directory "$base" \
   --database-url sqlite:///:memory: --disable-api-nodes) > "$tmp/quicktest.log" 2>&1 \
  || { tail -40 "$tmp/quicktest.log" >&2; rm -rf "$base"; exit 1; }
rm -rf "$base"
echo "ComfyUI ready: COMFYUI_DIR=$dest $venv/bin/python -m pytest tests/integration -v"
