#!/usr/bin/env bash
# Project set-up and the two quickstart jobs. Needs only python3 (3.10+) and pip.
#   bash dev.sh demo   - install (first run), then run the main job on the embedded default
#   bash dev.sh test   - install (first run), then run the test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV="${DODNET_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then python3 -m venv "$VENV"; fi
  local stamp="$VENV/.dodnet-installed"
  local want
  want="$(cat setup.cfg pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -c constraints.txt -e ".[test,bench]"
    echo "$want" > "$stamp"
  fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  demo) setup; exec "$VENV/bin/dodnet-demo" "$@" ;;
  test) setup; exec "$PY" -m pytest "$@" ;;
  setup) setup ;;
  *) echo "usage: bash dev.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
