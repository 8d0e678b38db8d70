#!/usr/bin/env bash
# Set up everything `make` needs from nothing: a Python that MegEngine 1.13 supports (3.8-3.10),
# libjpeg-turbo (runtime + headers), .venv, and this package (editable, with the dev extra).
# Idempotent and quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv

say() { echo "[bootstrap] $*" >&2; }

probe() {  # prints the interpreter's path when it runs and is 3.8-3.10
  "$1" -c 'import sys; assert (3, 8) <= sys.version_info[:2] <= (3, 10); print(sys.executable)' 2>/dev/null
}

find_python() {
  local c found
  for c in python3.10 python3.9 python3.8; do
    if command -v "$c" >/dev/null 2>&1 && found=$(probe "$c"); then echo "$found"; return 0; fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local root; root=$(pyenv root)
    for c in $(ls -d "$root"/versions/3.10.* "$root"/versions/3.9.* "$root"/versions/3.8.* 2>/dev/null | sort -rV); do
      if found=$(probe "$c/bin/python"); then echo "$found"; return 0; fi
    done
  fi
  return 1
}

need_pkgs=()
ldconfig -p 2>/dev/null | grep -q 'libturbojpeg\.so' || need_pkgs+=(libturbojpeg0)
[ -f /usr/include/jpeglib.h ] || need_pkgs+=(libjpeg62-turbo-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${need_pkgs[*]} (libjpeg-turbo runtime for PyTurboJPEG, headers for the ROI decoder)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    say "missing system packages: ${need_pkgs[*]}. Install them, then rerun:"
    say "  sudo apt-get install ${need_pkgs[*]}"
    exit 1
  fi
fi

if ! { [ -x $VENV/bin/python ] && probe $VENV/bin/python >/dev/null; }; then
  PY=$(find_python) || {
    say "no Python 3.8-3.10 found (MegEngine 1.13 publishes wheels only up to CPython 3.10)."
    say "Install one, e.g. 'pyenv install 3.10' or 'apt-get install python3.10-venv', then rerun."
    exit 1
  }
  say "creating $VENV with $PY"
  rm -rf $VENV
  "$PY" -m venv $VENV
  $VENV/bin/python -m pip install -q --upgrade pip
fi

stamp=$VENV/.engine-installed
if [ ! -f $stamp ] || [ setup.py -nt $stamp ]; then
  say "installing engine and its dependencies into $VENV (MegEngine is ~940 MB on first download)"
  $VENV/bin/python -m pip install -q -e '.[dev]'
  touch $stamp
fi
if [ -f engine/data/_jpegroi.c ] && { ! ls engine/data/_jpegroi*.so >/dev/null 2>&1 || [ engine/data/_jpegroi.c -nt "$(ls engine/data/_jpegroi*.so | head -1)" ]; }; then
  say "building the ROI JPEG decoder"
  $VENV/bin/python setup.py -q build_ext --inplace >/dev/null
fi
