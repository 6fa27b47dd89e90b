#!/usr/bin/env bash
# Device call 24 (one H200, session 12, 2026-12-03): GPU tests of the Gluon prefill kernels
# (with 4 and 8 warps a program, rows past H and I masked, a CUDA graph capture);
# tools/wgmma_prefill.py variants of the GEMM core at 4096 tokens (one or two warpgroups a
# program, ring stages, contiguous or gathered activation rows); the layer's stage breakdown
# with 4 and 8 warps a program (prefill_wgmma.NUM_WARPS set in the process), same call.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader | head -1; date -u
timeout 150 python3 -m pytest -q -m gpu tests/test_prefill_wgmma.py 2>&1 | tail -5 | tee $OUT/tests_wgmma.log
timeout 150 python3 tools/wgmma_prefill.py --tokens 4096 2>&1 | tail -14 | tee $OUT/wgmma_variants.log
for shape in v4-flash gpt-oss-120b; do
  for ws in 4x4 8x4 8x3; do
    echo "NUM_WARPS x NUM_STAGES = $ws" | tee -a $OUT/breakdown.log
    timeout 60 python3 -c "
import sys
from megamoe.kernels import prefill_wgmma as pw
pw.NUM_WARPS, pw.NUM_STAGES = map(int, '$ws'.split('x'))
from megamoe.bench import breakdown
breakdown.main(['--shape', '$shape', '--tokens', '4096,8192'])" 2>&1 | tail -3 | tee -a $OUT/breakdown.log
  done
done
