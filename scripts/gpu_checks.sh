#!/usr/bin/env bash
# Every check that needs a CUDA device, in one run (for the GPU machine; CI is CPU-only): the device and kernel
# tests, then the GPU benchmarks, whose results are copied into $OUT (default ./gpu-out).
# Usage: OUT=dir bash scripts/gpu_checks.sh   (PYTHONPATH may add folders holding peers such as hqq)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 240 python -m pytest -q -p no:cacheprovider -o addopts="" -rs \
  tests/unit/quantizers/test_device.py tests/unit/nn/test_kernel.py tests/unit/test_config.py 2>&1 \
  | tee "$OUT/tests.log" | tail -20
(cd benchmarks && timeout 200 python gpu_speed.py 2>&1 | tee "../$OUT/gpu_speed.log" | tail -20)
(cd benchmarks && timeout 200 python kernel_speed.py --repeats 100 2>&1 | tee "../$OUT/kernel_speed.log" | tail -20)
cp benchmarks/results/gpu_speed.* benchmarks/results/kernel_speed.* "$OUT/" 2>/dev/null
ls "$OUT"
