#!/usr/bin/env bash
# Prints the python of a virtual environment that can run the ComfyUI at $1, building it on first use.
# It lives outside the checkout and is rebuilt only when ComfyUI's requirements or ours change.
# ComfyUI needs torchvision and torchaudio; the set that installs and imports on our machines is
# torch 2.9.1 + torchvision 0.24.1 + torchaudio 2.9.1 (comfy-angle and PyOpenGL are optional and left out).
set -euo pipefail
comfy=$1
here=$(cd "$(dirname "$0")/.." && pwd)
reqs=$(grep -vE '^\s*(torch|torchvision|torchaudio|comfy-angle|PyOpenGL)\b' "$comfy/requirements.txt" | sed 's/#.*//' | grep -v '^\s*$' || true)
key=$( (echo "$reqs"; cat "$here/requirements.txt"; echo "torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1") | sha256sum | cut -c1-16)
root=${ZIMAGE_COMFY_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/zimage-comfyui-venv}
venv=$root/$key
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"; mkdir -p "$root"
  echo "building ComfyUI venv in $venv (first run only; several GB)" >&2
  python3 -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" torch==2.9.1 torchvision==0.24.1 >&2
  "${pip[@]}" torch==2.9.1 'torchaudio==2.9.*' >&2
  printf '%s\n' "$reqs" > "$venv/comfy-requirements.txt"
  "${pip[@]}" -r "$venv/comfy-requirements.txt" -r "$here/requirements.txt" torch==2.9.1 torchvision==0.24.1 >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"
