#!/usr/bin/env bash
# The wheels the GPU machine lacks (bench/gpu/wheels.txt), into .whl/ (git-ignored), for
# device_pass.sh: run where pip reaches PyPI, then name .whl in the device command's carry. The
# machine's image (image-packages.txt) has Python 3.12, PyTorch, transformers and the rest.
#
#   bash bench/gpu/fetch_wheels.sh [PYTHON_VERSION]   # 3.12 unless given
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
VERSION=${1:-3.12}
rm -rf .whl  # one version of each: two would stop the install there
mapfile -t pins < <(grep -v '^#' bench/gpu/wheels.txt | grep .)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -l .whl
