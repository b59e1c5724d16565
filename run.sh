#!/usr/bin/env bash
# ghnviz quick start. Usage:
#   bash run.sh app     # install (first time) and start the app on the shipped GHN
#   bash run.sh test    # install (first time) and run the whole test suite
# The virtual environment lives in .venv (override with GHNVIZ_VENV); it is (re)installed
# whenever requirements.txt changes.
set -eo pipefail
cd "$(dirname "$0")"
VENV=${GHNVIZ_VENV:-.venv}
PY=${PYTHON:-python3}

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.ghnviz-installed"
  if [ ! -f "$stamp" ] || ! cmp -s requirements.txt "$stamp"; then
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    echo "installing ghnviz and its dependencies into $VENV (first run only; a few minutes)" >&2
    # the local wheel mirrors print a warning per package they do not hold: keep the output readable
    "$VENV/bin/python" -m pip install -q -r requirements.txt 2>&1 | { grep -v 'is ignored: it is neither' || true; }
    "$VENV/bin/python" -m pip install -q --no-deps -e . 2>&1 | { grep -v 'is ignored: it is neither' || true; }
    cp requirements.txt "$stamp"
  fi
}

ensure_system_packages() {
  # Debian packages the tests use: Chromium (browser test) and the Fashion-MNIST files.
  # Installed when missing and we can (root + apt); otherwise those tests say what is absent.
  local missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  [ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
  if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

case "${1:-}" in
  app)
    ensure_venv
    shift
    exec "$VENV/bin/python" -m streamlit run app.py --server.headless true "$@"
    ;;
  test)
    ensure_venv
    ensure_system_packages
    shift
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: bash run.sh app|test [extra args]" >&2
    exit 2
    ;;
esac
