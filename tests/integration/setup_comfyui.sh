#!/usr/bin/env bash
# Prepare a ComfyUI checkout for the integration suite: installs ComfyUI's requirements into PYTHON's environment
# without changing torch (torchvision and torchaudio: the builds that match the installed torch), then checks that
# ComfyUI starts. ComfyUI's code is NOT part of this repository; get it any way you like, e.g.
#     git clone --depth 1 --branch v0.33.0 https://github.com/Comfy-Org/ComfyUI ComfyUI-0.33.0
# Tested versions: 0.3.64 (the oldest supported) and 0.33.0. Give each version its own venv: they pin different
# frontends (comfyui-frontend-package), and a second install silently replaces the first one's.
#
# Usage: tests/integration/setup_comfyui.sh COMFYUI_DIR [PYTHON]
#   COMFYUI_DIR  a ComfyUI checkout (has main.py and requirements.txt)
#   PYTHON       the interpreter of the venv that has this package installed (default: python3 on PATH)
# Then: COMFYUI_DIR=COMFYUI_DIR PYTHON -m pytest tests/integration
set -euo pipefail
dir=${1:?usage: setup_comfyui.sh COMFYUI_DIR [PYTHON]}
py=${2:-python3}
[ -f "$dir/main.py" ] && [ -f "$dir/requirements.txt" ] || { echo "$dir is not a ComfyUI checkout (no main.py)" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
torch_version=$("$py" -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$torch_version" > "$tmp/constraints.txt"
grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$dir/requirements.txt" > "$tmp/req.txt"
"$py" -m pip install -q -r "$tmp/req.txt" -c "$tmp/constraints.txt"
for extra in torchvision torchaudio; do
  "$py" -c "import $extra" 2>/dev/null && continue
  # the build made for this torch; where the registry has none yet (torchaudio lags behind torch), its newest
  # release without dependencies, kept only if it imports
  "$py" -m pip install -q "$extra" -c "$tmp/constraints.txt" 2>/dev/null \
    || { "$py" -m pip install -q --no-deps "$extra" && "$py" -c "import $extra"; } \
    || echo "warning: no $extra for torch $torch_version; ComfyUI versions that import it will not start" >&2
done

# smoke test: start and exit (writes nothing into the repo; uses a throwaway base directory)
base=$(mktemp -d); mkdir -p "$base/custom_nodes"
(cd "$dir" && "$py" main.py --cpu --quick-test-for-ci --base-directory "$base" \
   --database-url sqlite:///:memory: --disable-api-nodes) > "$tmp/quicktest.log" 2>&1 \
  || { tail -40 "$tmp/quicktest.log" >&2; rm -rf "$base"; exit 1; }
rm -rf "$base"
echo "COMFYUI_DIR=$(cd "$dir" && pwd)"
