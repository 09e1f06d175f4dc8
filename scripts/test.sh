#!/usr/bin/env bash
# Install what hotswap needs (CPU torch first, so nothing pulls the CUDA build) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
python3 -m pytest tests -q -p no:cacheprovider "$@"
