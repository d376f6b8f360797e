#!/usr/bin/env bash
# Wheels the GPU machine lacks, into .whl/ (git-ignored), for run_all.sh: run where pip reaches
# PyPI, then name .whl in the device command's carry. That machine's image has Python 3.12 and
# already holds PyTorch, transformers, tokenizers, safetensors, numpy, tqdm, prometheus-client,
# msgpack, uvloop, matplotlib and pytest (with pytest-timeout); msgspec and pyzmq are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
$PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl msgspec==0.22.0 pyzmq==27.3.0
ls -l .whl
