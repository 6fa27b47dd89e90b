#!/usr/bin/env bash
# Device call 22 (one H200, session 11): the Gluon prefill kernels in the layer
# (kernels/prefill_wgmma.py): their GPU tests, then the stage breakdown at 4096 tokens with
# them (MEGAMOE_WGMMA=1) and with the Triton prefill tiles (MEGAMOE_WGMMA=0), same call.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader | head -1; date -u
timeout 240 python3 -m pytest -q -x -m gpu tests/test_prefill_wgmma.py 2>&1 | tail -30 | tee $OUT/tests.log
for w in 1 0; do
  MEGAMOE_WGMMA=$w timeout 100 python3 -m megamoe.bench.breakdown --shape v4-flash --tokens 4096 2>&1 | tail -3 | tee -a $OUT/breakdown.log
done
