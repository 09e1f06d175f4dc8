#!/usr/bin/env bash
# Install what hotswap needs (CPU torch first, so nothing pulls the CUDA build) and run the tests, two at a time
# (pytest-xdist: most tests wait on subprocesses and sockets, so two workers halve the wall time on CI's 2 cores;
# a later -n given to this script wins).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
python3 -m pytest tests -q -p no:cacheprovider -n 2 "$@"
