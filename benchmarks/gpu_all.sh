#!/usr/bin/env bash
# Everything the GPU kernels need checked and timed on one H100/H200, in one call (~8 min).
#
#   bash benchmarks/gpu_all.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else ./gpu_out
#
# Made for a device lease of ~15 minutes in all: prepare and compile-check on the CPU first
# (tests/test_aot.py, benchmarks/compile_sweep.py), then send this script once. Each stage has
# its own time limit and a failed stage does not stop the next, so one call always brings back
# the versions, the GPU test log and whatever tables finished. It uses the machine's python3
# (its own jax, torch and triton) and the repository on PYTHONPATH: nothing is installed.
#
# Writes: env.txt (versions, GPU, CUDA), pytest_gpu.log (`pytest -m gpu` on the kernel tests:
# every backend against the float64 references), bsr_matmul.{log,json} (Mosaic GPU and Triton
# block-sparse matmul vs cuBLAS jnp.dot, jax BCSR and torch BSR), attention.{log,json}
# (Mosaic GPU and Triton block-sparse attention vs cuDNN and torch FlexAttention).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
status=0

stage() {  # stage NAME LIMIT_S CMD...: run CMD with a limit, log to $out/NAME.log, keep going
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$py" - <<'EOF'
import jax, jaxlib, sys
print("python", sys.version.split()[0], "jax", jax.__version__, "jaxlib", jaxlib.__version__)
print("devices", jax.devices())
for mod in ("torch", "triton", "jax_triton"):
  try:
    print(mod, __import__(mod).__version__)
  except Exception as e:  # pylint: disable=broad-except
    print(mod, "unavailable:", type(e).__name__, e)
from pallas_kernels.attention.kernel_mosaic_gpu import _cuda_runtime_version
print("cudaRuntimeGetVersion", _cuda_runtime_version())
EOF
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

stage pytest_gpu 240 "$py" -m pytest -m gpu -q -p no:cacheprovider -p no:xdist \
  tests/test_bsr_kernels.py tests/test_attention_kernels.py
stage bsr_matmul 150 "$py" benchmarks/bsr_matmul.py --backend mosaic_gpu,triton \
  --json "$out/bsr_matmul.json"
stage attention 150 "$py" benchmarks/attention.py --json "$out/attention.json"
echo "gpu_all: $([ $status -eq 0 ] && echo all stages passed || echo some stage failed) ($SECONDS s)"
exit $status
