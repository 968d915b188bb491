#!/usr/bin/env bash
# The whole test suite from a fresh checkout: builds .venv (pinned torch, diffusers/transformers as
# references), and when a ComfyUI is found (COMFYUI_PATH, else ~/ComfyUI) the separate venv that runs it
# for the integration tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${ZIMAGE_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
comfy=${COMFYUI_PATH:-$HOME/ComfyUI}
if [ -f "$comfy/main.py" ]; then
  export COMFYUI_PATH=$comfy
  ZIMAGE_COMFY_PYTHON=$(scripts/comfyui_venv.sh "$comfy")
  export ZIMAGE_COMFY_PYTHON
  # the browser tests drive Debian's chromium (never a browser downloaded by a test tool)
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser tests" >&2
    (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
      || echo "could not install chromium: the browser tests will be skipped" >&2
  fi
else
  echo "no ComfyUI at $comfy: the real-ComfyUI tests will be skipped (set COMFYUI_PATH)" >&2
fi
exec "$venv/bin/python" -m pytest "$@"
