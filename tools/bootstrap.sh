#!/usr/bin/env bash
# Set up everything `make` needs from nothing: a Python that MegEngine 1.13 supports (3.8-3.10),
# libjpeg-turbo (runtime + headers), .venv, MegEngine, and this package (editable, with the dev
# extra). Idempotent and quick when nothing changed.
#
# Which MegEngine build comes from the environment (default: the PyPI wheel, a CUDA 10.1 build
# whose kernels stop at sm_75; README "Running on GPUs" says which build each GPU needs):
#   MEGENGINE_SPEC         pip requirement, default megengine==1.13.0 (e.g. megengine==1.13.4+cu118)
#   MEGENGINE_FIND_LINKS   pip -f location, e.g. https://www.megengine.org.cn/whl/mge.html
#   MEGENGINE_INDEX_URL    pip --extra-index-url, for a PEP 503 mirror of such wheels
# The venv records the requirement it was installed with; when it changes, MegEngine is
# reinstalled (forced: 1.13.0 and 1.13.0+cu118 share a version number).
# `tools/bootstrap.sh --megengine-plan` prints what would be done and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ENGINE_VENV:-.venv}

say() { echo "[bootstrap] $*" >&2; }

MEGENGINE_SPEC=${MEGENGINE_SPEC:-megengine==1.13.0}
mge_args=("$MEGENGINE_SPEC")
[ -n "${MEGENGINE_FIND_LINKS:-}" ] && mge_args+=(-f "$MEGENGINE_FIND_LINKS")
[ -n "${MEGENGINE_INDEX_URL:-}" ] && mge_args+=(--extra-index-url "$MEGENGINE_INDEX_URL")
mge_want="${mge_args[*]}"
mge_stamp=$VENV/.engine-megengine


mge_plan() {  # install (never recorded) | reinstall (the requirement changed) | ok
  if [ ! -f "$mge_stamp" ]; then echo install
  elif [ "$(cat "$mge_stamp")" != "$mge_want" ]; then echo reinstall
  else echo ok; fi
}

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

# ------------------------------------------------------------------------------ libjpeg-turbo

any_python() {  # a Python to run engine/libjpeg.py with (standard library only)
  if [ -x $VENV/bin/python ] && probe $VENV/bin/python >/dev/null; then echo $VENV/bin/python
  elif find_python; then :
  else command -v python3 || true; fi
}

can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

jpeg_find() {  # sets jpeg_runtime, jpeg_runtime_from, jpeg_include, jpeg_include_from, jpeg_link_dir
  local py; py=$(any_python)
  if [ -z "$py" ]; then say "no Python found to look for libjpeg-turbo with"; exit 1; fi
  eval "$("$py" engine/libjpeg.py)"
}

JPEG_HOW="conda install -c conda-forge libjpeg-turbo (no root; then activate that environment), \
module load libjpeg-turbo where a module system has it, or TURBOJPEG_LIB=<the library or its \
prefix>; as root: apt-get install libturbojpeg0 libjpeg62-turbo-dev"

jpeg_missing() {  # the apt packages of what was not found
  [ -n "$jpeg_runtime" ] || echo libturbojpeg0
  [ -n "$jpeg_include" ] || echo libjpeg62-turbo-dev
}

jpeg_report() {  # what was found and what happens next, one line each; 1: the install must stop
  local missing; missing=$(jpeg_missing | tr '\n' ' ')
  if [ -n "$jpeg_runtime" ]; then echo "libturbojpeg: $jpeg_runtime (from $jpeg_runtime_from)"
  else echo "libturbojpeg: not found"; fi
  if [ -n "$jpeg_include" ]; then
    echo "ROI decoder: built against $jpeg_include (from $jpeg_include_from${jpeg_link_dir:+, linking $jpeg_link_dir})"
  else
    echo "ROI decoder: skipped, no libjpeg-turbo headers (jpeglib.h) found; the loader uses PyTurboJPEG (for the headers: $JPEG_HOW)"
  fi
  if [ -n "$missing" ] && can_apt; then
    echo "as root: apt-get install ${missing% }"
  elif [ -z "$jpeg_runtime" ]; then
    echo "cannot continue: libturbojpeg (libjpeg-turbo's runtime library, which PyTurboJPEG decodes with) is needed; looked in TURBOJPEG_LIB, CONDA_PREFIX, EBROOTLIBJPEGMINTURBO, LD_LIBRARY_PATH, LIBRARY_PATH and the system's folders. Get it with $JPEG_HOW, then rerun"
    return 1
  fi
  return 0
}

if [ "${1:-}" = "--megengine-plan" ]; then
  case $(mge_plan) in
    install) echo "megengine: install: pip install ${mge_want}" ;;
    reinstall) echo "megengine: reinstall (was: $(cat "$mge_stamp")): pip install --force-reinstall --no-deps ${mge_want}" ;;
    ok) echo "megengine: up to date: ${mge_want}" ;;
  esac
  exit 0
elif [ "${1:-}" = "--check-jpeg" ]; then  # what the install would find and do; changes nothing
  jpeg_find
  jpeg_report
  exit $?
elif [ $# -gt 0 ]; then
  say "unknown argument $1 (the only ones are --megengine-plan and --check-jpeg)"
  exit 2
fi

jpeg_find
if [ -n "$(jpeg_missing)" ] && can_apt; then
  need_pkgs=($(jpeg_missing))
  say "installing ${need_pkgs[*]} (libjpeg-turbo runtime for PyTurboJPEG, headers for the ROI decoder)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  jpeg_find
fi
if ! jpeg_lines=$(jpeg_report); then
  say "$(echo "$jpeg_lines" | tail -1)"
  exit 1
fi
# one line each for what is not the system's usual: a user's own copy, no headers
[ "$jpeg_runtime_from" = "the system" ] || say "$(echo "$jpeg_lines" | grep '^libturbojpeg:')"
[ -n "$jpeg_include" ] || say "$(echo "$jpeg_lines" | grep '^ROI decoder:')"

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

case $(mge_plan) in
  install)
    say "installing ${mge_want} into $VENV (the PyPI wheel is ~940 MB on first download)"
    $VENV/bin/python -m pip install -q "${mge_args[@]}" ;;
  reinstall)
    say "MegEngine requirement changed from '$(cat "$mge_stamp")' to '${mge_want}': reinstalling"
    # --no-deps: numpy & co. stay as setup.py pins them; the next step adds anything missing
    $VENV/bin/python -m pip install -q --force-reinstall --no-deps "${mge_args[@]}" ;;
esac
printf '%s\n' "$mge_want" > "$mge_stamp"

stamp=$VENV/.engine-installed
if [ ! -f $stamp ] || [ setup.py -nt $stamp ]; then
  say "installing engine and its dependencies into $VENV"
  $VENV/bin/python -m pip install -q -e '.[dev]'
  touch $stamp
fi
if [ -n "$jpeg_include" ] && [ -f engine/data/_jpegroi.c ] && { ! ls engine/data/_jpegroi*.so >/dev/null 2>&1 || [ engine/data/_jpegroi.c -nt "$(ls engine/data/_jpegroi*.so | head -1)" ]; }; then
  say "building the ROI JPEG decoder"
  $VENV/bin/python setup.py -q build_ext --inplace >/dev/null
fi
