#!/usr/bin/env bash
# `make gpu-check`: the whole GPU bring-up in one command, on a bare CUDA machine with torch + triton + transformers
# preinstalled (no network, no pip, no fastapi/openai, pytest optional). Steps, each with its own timeout so the
# whole run fits ~8 minutes on an H200 and a scarce GPU lease is never spent waiting:
#   0. detect (gpu/detect.py): no CUDA GPU -> say so and exit 0
#   1. `import stablelm_fast` (+ LLM, triton backend, CUDA graphs) with the server packages blocked
#   2. build the extension in place for the GPU present (TORCH_CUDA_ARCH_LIST=<its capability>, setup.py)
#   3. tests/gpu/ + tests/ops/ through gpu/minitest.py: every CUDA and Triton kernel vs the torch reference, the
#      engine vs HF (budgets: build 240 s, tests 240 s + the test running then, bench 200 s)
#   4. gpu/bench.py: 1.6B / 3B / 12B-shaped dummy weights, decode and prefill vs the measured HBM / matmul peak
#   5. gpu/summary.py: one screen; everything (logs, JSON) under $OUT if set, else gpu/results/<timestamp>/
# Exit status: 0 when every step passed (or there is no GPU), 1 otherwise.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET STABLELM_FAST_TEST_DEVICE
RES="${OUT:-$ROOT/gpu/results/$(date -u +%Y%m%d-%H%M%S)}"
T0=$(date +%s)
step() { echo "[gpu-check +$(( $(date +%s) - T0 ))s] $*"; }

# No pip install here: the Triton kernels are importable as stablelm_fast.kernels through the same link a
# development checkout uses (pyproject's package-dir maps it when installed).
[ -e stablelm_fast/kernels ] || ln -s ../kernels stablelm_fast/kernels
eval "$("$PY" -m gpu.detect --shell 2>/dev/null)" || { echo "gpu-check: cannot run $PY"; exit 1; }
if [ -z "${SLF_TORCH:-}" ]; then
  echo "gpu-check: $PY cannot import torch: not a GPU environment, nothing to check (exit 0). Set PY=<python>."
  exit 0
fi
step "1/5 import without server dependencies"
IMPORT_LOG="$(mktemp)"
"$PY" - > "$IMPORT_LOG" 2>&1 <<'EOF'
import sys
class _Block:  # the server's packages must not be needed by the library, the kernels or the engine
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fastapi", "uvicorn", "openai", "httpx", "starlette"):
            raise ImportError(f"{name} is blocked by gpu-check")
sys.meta_path.insert(0, _Block())
import stablelm_fast
from stablelm_fast import LLM, SamplingParams  # noqa: F401
import stablelm_fast.ops.triton_ops, stablelm_fast.engine.cuda_graph  # noqa: F401
print("import ok:", stablelm_fast.__file__)
EOF
IMPORT_RC=$?
cat "$IMPORT_LOG"

DETECT="$SLF_LINE"
echo "$DETECT"
if [ -z "$SLF_GPU" ]; then
  rm -f "$IMPORT_LOG"
  [ "$IMPORT_RC" = 0 ] || { echo "gpu-check: import stablelm_fast FAILED without the server packages"; exit 1; }
  echo "gpu-check: no CUDA GPU on this machine: nothing to check (exit 0). Run it where torch sees a GPU."
  exit 0
fi
mkdir -p "$RES"
echo "$DETECT" > "$RES/detect.txt"
mv "$IMPORT_LOG" "$RES/import.log"
echo "import=$IMPORT_RC" > "$RES/steps.txt"

step "2/5 build the extension for sm_${SLF_CAPABILITY/./} (CUDA kernels: $([ "$SLF_BUILD_CUDA" = 1 ] && echo yes || echo 'no, nvcc missing'))"
command -v ninja >/dev/null 2>&1 || echo "  (ninja not found: torch compiles the sources one by one, slower)"
rm -f stablelm_fast/_C*.so
(
  export TORCH_CUDA_ARCH_LIST="$SLF_ARCH_LIST" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  [ "$SLF_BUILD_CUDA" = 1 ] || export STABLELM_FAST_NO_CUDA=1
  timeout 240 "$PY" setup.py -q build_ext --inplace
) > "$RES/build.log" 2>&1
echo "build=$?" >> "$RES/steps.txt"
tail -3 "$RES/build.log"

step "3/5 kernels and engine vs references (tests/gpu)"
# tests/gpu first (kernels at the models' shapes, the engine vs HF), then the per-op tests of tests/ops, which on
# a GPU run the Triton kernels compiled and the CUDA kernels at every size the CPU run skips
timeout 300 "$PY" -m gpu.minitest tests/gpu/test_gpu_kernels.py tests/gpu/test_gpu_quant.py tests/gpu/test_gpu_engine.py \
  tests/ops/test_op_*.py \
  --json "$RES/gpu-tests.json" --deadline-s 240 2>&1 | tail -40 > "$RES/tests.log"
echo "tests=${PIPESTATUS[0]}" >> "$RES/steps.txt"
tail -5 "$RES/tests.log"

step "4/5 benchmark (dummy weights)"
timeout 200 "$PY" -m gpu.bench --json "$RES/gpu-bench.json" > "$RES/bench.log" 2>&1
echo "bench=$?" >> "$RES/steps.txt"

step "5/5 summary"
"$PY" -m gpu.summary "$RES" | tee "$RES/summary.txt"
exit "${PIPESTATUS[0]}"
