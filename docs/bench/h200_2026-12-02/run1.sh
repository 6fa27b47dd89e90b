#!/usr/bin/env bash
# Device call 1 (one H200): CUDA-core FMA streaming of MXFP4 weights (tools/fma_stream.py) against a
# read-only kernel of the same bytes, and the current decode L1/L2 stages in the same call.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
timeout 100 python3 -m megamoe.bench.breakdown --tokens 1,8 2>&1 | grep -v "^$" | tee $O/breakdown.log
timeout 400 python3 tools/fma_stream.py 2>&1 | tee $O/fma_stream.log
