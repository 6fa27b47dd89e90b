#!/usr/bin/env bash
# Device call 20 (one H200, session 11): tools/wgmma_prefill.py -- a Gluon prefill tile with
# the weight scales folded into the decoded FP8, decoded into shared memory while the previous
# step's asynchronous wgmma runs; checked against float64, timed on v4-flash's L1 and L2 GEMMs,
# and the layer's stages at the same token counts in the same call (breakdown).
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader | head -1; date -u
timeout 330 python3 tools/wgmma_prefill.py 2>&1 | tail -60 | tee $OUT/wgmma_prefill.log
timeout 200 python3 -m megamoe.bench.breakdown --shape v4-flash --tokens 4096,8192 2>&1 | tail -8 | tee $OUT/breakdown.log
