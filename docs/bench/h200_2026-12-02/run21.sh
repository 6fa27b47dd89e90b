#!/usr/bin/env bash
# Device call 21 (one H200, session 11): tools/wgmma_prefill.py after call 20: weight scales
# through the cp.async ring (they were plain loads, a memory latency every step) and one
# shared-memory tile per scale group (no barriers between the decode's stores); the layer's
# stages again in the same call.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader | head -1; date -u
timeout 330 python3 tools/wgmma_prefill.py 2>&1 | tail -60 | tee $OUT/wgmma_prefill.log
timeout 200 python3 -m megamoe.bench.breakdown --shape v4-flash --tokens 4096,8192 2>&1 | tail -8 | tee $OUT/breakdown.log
