#!/usr/bin/env bash
# Create (or refresh) the project virtual environment and install everything the project needs:
# torch/torchvision and the Python requirements at the tested versions (constraints.txt),
# Detectron2 through tools/install_detectron2.py, panopticapi, and this package in editable mode.
#
# The install is skipped when the venv already holds a stamp for the current requirements,
# constraints and installer (so `make test` starts the tests within seconds on a second run).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
inputs=(requirements.txt requirements-export.txt requirements-serve.txt requirements-nodeps.txt
        constraints.txt pyproject.toml
        tools/install_detectron2.py tools/setup_env.sh)
hash=$(cat "${inputs[@]}" | sha256sum | cut -c1-16)
stamp="$VENV/.knet-install-$hash"

if [ -f "$stamp" ]; then
  echo "[setup_env] $VENV is up to date ($(basename "$stamp")); skipping install"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup_env] creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

pip_install -c constraints.txt pip setuptools wheel
# torch first: Detectron2's sdist imports it while pip prepares its metadata.
pip_install -c constraints.txt torch torchvision
pip_install -r requirements.txt -c constraints.txt
pip_install -r requirements-export.txt -c constraints.txt
pip_install -r requirements-serve.txt -c constraints.txt
pip_install --no-deps -r requirements-nodeps.txt
"$py" tools/install_detectron2.py
# The browser test of the web demo drives Debian's chromium (no browser download): installed
# when missing and apt-get can run (as root); without it that test is skipped.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
  else
    echo "[setup_env] chromium/chromedriver missing: the browser test will be skipped"
  fi
fi
pip_install --no-deps --no-build-isolation -e .
"$py" -c "import detectron2, knet, panopticapi; print('[setup_env] detectron2', detectron2.__version__)"

rm -f "$VENV"/.knet-install-*
touch "$stamp"
echo "[setup_env] install took $(( $(date +%s) - start )) s"
