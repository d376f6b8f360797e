#!/usr/bin/env bash
# The GPU validation, for a fresh H100/H200 machine with PyTorch 2.11, transformers and
# no network. Each STEP fits one 10-minute device command and sets itself up, so it also runs on
# a machine that was handed back and started anew in between (docs/gpu.md):
#
#   bash bench/gpu/run_all.sh 1   # setup, CUDA tests, SantaCoder-shape benchmark     (~9 min)
#   bash bench/gpu/run_all.sh 2   # setup, StarCoder-shape benchmark                  (~9 min)
#   bash bench/gpu/run_all.sh 3   # setup, `splitserve bench serve` over cuda_ipc     (~5 min)
#
# Results go to $OUT (the device tool's folder; bench/results/gpu-run elsewhere), at most 8 files
# a step. Each step's time boxes are below; a benchmark that reaches its deadline skips its
# remaining points (listed in its JSON) rather than being killed mid-write.
set -uo pipefail
cd "$(dirname "$0")/../.."
STEP=${1:-}
[[ $STEP =~ ^[123]$ ]] || { echo "usage: run_all.sh 1|2|3" >&2; exit 2; }
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SPLITSERVE_HOME=/tmp/splitserve-home
PY=python3

setup() {
    # The wheels the machine lacks (msgspec, pyzmq), carried in .whl/ (bench/gpu/fetch_wheels.sh).
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "no wheels in .whl/: run bench/gpu/fetch_wheels.sh where pip works, and carry .whl"; exit 1; }
    export PYTHONPATH=/tmp/site
    # On top of the installed PyTorch; build isolation would try to download setuptools.
    $PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    {
        nvidia-smi -L
        $PY - <<'EOF'
import inspect, sys, torch, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| transformers", transformers.__version__)
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
except ImportError as e:
    print("no torch.nn.attention.varlen:", e)
print(torch.ops.aten._flash_attention_forward.default._schema)
for name in ("flash_attn", "triton"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "not installed")
EOF
    } 2>&1 | tee "$OUT/env-step$STEP.txt"
}

case $STEP in
1)
    setup
    # -s: the handoff test prints its timings
    timeout 150 $PY -m pytest -q -s -rs -p no:cacheprovider tests/test_cuda.py tests/test_cuda_graphs.py \
        tests/test_kv_transport.py 2>&1 | tee "$OUT/tests.log"
    timeout 400 $PY bench/gpu/gpu_bench.py --shape santacoder --out-dir "$OUT" --deadline 300 \
        2>&1 | tee "$OUT/bench-santacoder.log"
    ;;
2)
    setup
    timeout 560 $PY bench/gpu/gpu_bench.py --shape starcoder --out-dir "$OUT" --deadline 420 \
        2>&1 | tee "$OUT/bench-starcoder.log"
    ;;
3)
    setup
    # One prefill and one decode worker on the one GPU, so the KV handoff is cuda_ipc; the
    # in-process engine under the same load beside it. The tiny model: this checks the pipeline.
    timeout 300 $PY -m splitserve.cli bench serve --quick --model tiny-random --device cuda \
        --json "$OUT/serve-gpu-tiny.json" --plot-dir "$OUT" 2>&1 | tee "$OUT/bench-serve.log"
    ;;
esac

