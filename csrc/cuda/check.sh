#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 into a temp dir, without torch's CUDA headers
# (the kernels and their raw-pointer launchers only need the CUDA toolkit). torch_wrappers.cu is torch-facing
# and only has content under SLF_WITH_CUDA (a CUDA build of torch); here it compiles to an empty object.
# ptxas -v reports registers / stack / spills / shared memory per kernel (csrc/cuda/ptxas_report.py prints the
# table). Exits non-zero on a compile error or a register spill. Used by `make cuda-check`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/bin/nvcc)}"
[ -x "$NVCC" ] || { echo "cuda-check: nvcc not found" >&2; exit 1; }
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
shopt -s nullglob
SRCS=("$ROOT"/csrc/cuda/*.cu)
[ ${#SRCS[@]} -gt 0 ] || { echo "cuda-check: no .cu files" >&2; exit 1; }
echo "cuda-check: $("$NVCC" --version | tail -1)"
pids=()
for src in "${SRCS[@]}"; do
  obj="$OUT/$(basename "$src" .cu).o"
  (
    "$NVCC" -O3 -std=c++17 -I"$ROOT/csrc" \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
      -Xcompiler=-Wall -Xptxas=-v -c "$src" -o "$obj" 2>"$obj.log" \
      && echo "  ok    ${src#$ROOT/} -> sm_80, sm_90" \
      || { echo "  FAIL  ${src#$ROOT/}"; cat "$obj.log"; exit 1; }
  ) &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
if [ $status -ne 0 ]; then echo "cuda-check: FAILED" >&2; exit 1; fi
echo "cuda-check: ${#SRCS[@]} files compiled; ptxas resource usage:"
python3 "$ROOT/csrc/cuda/ptxas_report.py" "$OUT"/*.o.log || { echo "cuda-check: register spills" >&2; exit 1; }
