#!/usr/bin/env bash
# Device call 23 (one H200, session 11): after call 22 (a compile failure where a weight-scale
# row stride was not a multiple of 16: 2-byte cp.async), the scales move as int32 pairs. GPU
# tests (the new ones, then test_gpu, test_kernels, test_layer), then the stage breakdown with
# the Gluon prefill kernels (MEGAMOE_WGMMA=1) and the Triton prefill tiles (0), same call.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader | head -1; date -u
timeout 200 python3 -m pytest -q -m gpu tests/test_prefill_wgmma.py 2>&1 | tail -15 | tee $OUT/tests_wgmma.log
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py tests/test_layer.py 2>&1 | tail -5 | tee $OUT/tests_gpu.log
for shape in v4-flash gpt-oss-120b; do
  for w in 1 0; do
    echo "MEGAMOE_WGMMA=$w" | tee -a $OUT/breakdown.log
    MEGAMOE_WGMMA=$w timeout 100 python3 -m megamoe.bench.breakdown --shape $shape --tokens 4096,8192 2>&1 | tail -3 | tee -a $OUT/breakdown.log
  done
done
