#!/usr/bin/env bash
# Prints the python of a virtual environment that can run the ComfyUI at $1, building it on first use.
# It lives outside the checkout. The heavy part (torch, torchvision, torchaudio and ComfyUI's requirements) is
# keyed by ComfyUI's requirements alone and built once; our own requirements are installed on top whenever they
# change (a stamp in the venv), so adding a dependency to the pack costs seconds, not a rebuild.
# ComfyUI needs torchvision and torchaudio; the set that installs and imports on our machines is
# torch 2.9.1 + torchvision 0.24.1 + torchaudio 2.9.1 (comfy-angle and PyOpenGL are optional and left out).
set -euo pipefail
comfy=$1
here=$(cd "$(dirname "$0")/.." && pwd)
reqs=$(grep -vE '^\s*(torch|torchvision|torchaudio|comfy-angle|PyOpenGL)\b' "$comfy/requirements.txt" | sed 's/#.*//' | grep -v '^\s*$' || true)
key=$( (echo "$reqs"; echo "torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1") | sha256sum | cut -c1-16)
root=${ZIMAGE_COMFY_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/zimage-comfyui-venv}
venv=$root/$key
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
if [ ! -f "$venv/.complete" ]; then
  mkdir -p "$root"
  exec 9>"$root/.lock-$key"
  flock 9  # one build at a time: a second test run waits for the first instead of deleting its half-built venv
  if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    echo "building ComfyUI venv in $venv (first run only; several GB)" >&2
    python3 -m venv "$venv"
    "${pip[@]}" torch==2.9.1 torchvision==0.24.1 >&2
    "${pip[@]}" torch==2.9.1 'torchaudio==2.9.*' >&2
    printf '%s\n' "$reqs" > "$venv/comfy-requirements.txt"
    "${pip[@]}" -r "$venv/comfy-requirements.txt" torch==2.9.1 torchvision==0.24.1 >&2
    touch "$venv/.complete"
  fi
  exec 9>&-
fi
ours=$(sha256sum "$here/requirements.txt" | cut -c1-16)
if [ ! -f "$venv/.ours-$ours" ]; then
  exec 9>"$root/.lock-$key"
  flock 9
  "${pip[@]}" -r "$here/requirements.txt" torch==2.9.1 torchvision==0.24.1 >&2
  touch "$venv/.ours-$ours"
  exec 9>&-
fi
echo "$venv/bin/python"
