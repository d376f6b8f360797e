#!/usr/bin/env bash
# The device pass (docs/gpu.md), as one command on a freshly lent GPU machine: PyTorch 2.11,
# transformers and no network there, the wheels it lacks carried in .whl/ (fetch_wheels.sh).
#
#   bash bench/gpu/device_pass.sh [--stages setup,correctness,santacoder,qwen7b] [device_pass.py flags]
#
# The stage `setup` (in the default list; keep it in a rerun on a fresh machine, it is quick on a
# warm one) installs the wheels with pip --target into $SITE and the project, editable, on top of
# the image's PyTorch; then bench/gpu/device_pass.py runs the stages, writing into $OUT as it goes.
# The output goes to $OUT/device-pass.log too.
#
# PY, WHEELS, SITE and OUT may be set from outside: the CPU rehearsal (tests/test_device_pass.py)
# runs this very script with a stand-in for the device image's Python.
set -uo pipefail
cd "$(dirname "$0")/../.."
export DEVICE_PASS_T0=${DEVICE_PASS_T0:-$(date +%s.%N)}  # the pass's budget counts from here
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/device-pass}  # the device tool sets OUT
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# Nothing outside the device machine can be reached: no lookup should wait on a network there.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export SPLITSERVE_HOME=${SPLITSERVE_HOME:-/tmp/splitserve-home}
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
LOG=$OUT/device-pass.log

stages=setup,correctness,santacoder,qwen7b
args=()
while (($#)); do
    case $1 in
        --stages) stages=${2:-}; shift 2 || { echo "--stages needs a value" >&2; exit 2; } ;;
        --stages=*) stages=${1#--stages=}; shift ;;
        *) args+=("$1"); shift ;;
    esac
done

setup() {
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl)
    if ((${#wheels[@]} == 0)); then
        echo "no wheels in $WHEELS/: run bash bench/gpu/fetch_wheels.sh where pip reaches PyPI, and carry .whl"
        return 1
    fi
    echo "=== setup: ${#wheels[@]} wheels into $SITE, the project editable ($($PY --version 2>&1))"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
        || return 1
    # On top of the image's packages, without build isolation: that would download setuptools. A
    # setuptools too old for editable installs of a pyproject-only project gets a plain install.
    # (setuptools' warnings about this project's metadata are no news on the device: not shown)
    PYTHONWARNINGS=ignore "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
        || "$PY" -m pip install -q --no-deps --no-build-isolation . || return 1
}

if [[ ,$stages, == *,setup,* ]]; then
    setup 2>&1 | tee -a "$LOG"
    ((PIPESTATUS[0] == 0)) || { echo "setup failed" | tee -a "$LOG"; exit 1; }
fi
"$PY" bench/gpu/device_pass.py --stages "$stages" --out-dir "$OUT" "${args[@]}" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
