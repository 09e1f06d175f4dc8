#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the GPU machine lacks, built for its Python 3.12: the HTTP stack and the
# OpenAI client (openai<2 works with the httpx it has). scripts/gpu_runs.sh installs them from there for the suite and
# the HTTP stages; run this here once, then pass carry=[".whl"] to the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q -d .whl --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    fastapi starlette uvicorn h11 click pydantic pydantic-core annotated-types typing-inspection typing-extensions \
    annotated-doc orjson pyzmq prometheus-client 'openai<2' distro jiter sniffio tqdm opentelemetry-api
