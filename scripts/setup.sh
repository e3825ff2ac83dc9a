#!/usr/bin/env bash
# Set up ktransfer in ./.venv: the Fashion-MNIST data (Debian package, where apt exists), torch and the package.
#   scripts/setup.sh           for using ktransfer (the demo)
#   scripts/setup.sh --test    also what the test suite needs
# Environment: PYTHON (default python3.11, else python3), KTRANSFER_TORCH (the torch requirement to install).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=".[report]"
if [[ "${1:-}" == "--test" ]]; then extras=".[test]"; fi

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
if command -v apt-get >/dev/null && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  echo "installing Debian's dataset-fashion-mnist" >&2
  (as_root apt-get update -qq && as_root apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "could not install dataset-fashion-mnist; run 'ktransfer data download' or set KTRANSFER_FASHION_MNIST" >&2
fi
# The test suite opens the HTML report in a headless browser.
if [[ "${1:-}" == "--test" ]] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium (the report's rendering test)" >&2
  (as_root apt-get update -qq && as_root apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium; the report's rendering test fails without it when CI=true" >&2
fi

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# The CPU build of torch is enough for the demo. The tests also run timm models, which need
# torchvision, and this torchvision pairs with torch 2.14.1. Set KTRANSFER_TORCH to pick another.
torch_requirement="torch==2.13.0"
if [[ "${1:-}" == "--test" ]]; then torch_requirement="torch==2.14.1 torchvision==0.29.1"; fi
# The demo runs on any torch already in the venv (for example the one --test installed).
if [[ "${1:-}" == "--test" || -n "${KTRANSFER_TORCH:-}" ]] || ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086 # the requirement may name several packages
  .venv/bin/python -m pip install -q ${KTRANSFER_TORCH:-$torch_requirement}
fi
.venv/bin/python -m pip install -q -e "$extras"
echo "ktransfer is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))" >&2
