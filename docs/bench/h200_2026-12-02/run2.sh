#!/usr/bin/env bash
# Device call 2 (one H200): FMA tiles in the layer (breakdown variants) against the MMA decode tiles,
# then tools/fma_stream.py with unroll-by-2 prefetch, split K and FP8 activations.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
BD="python3 -m megamoe.bench.breakdown"
( timeout 150 $BD --tokens 1,8,64 --variants m16,fma1,fma2,fma1n64
  timeout 150 $BD --shape gpt-oss-120b --tokens 1,8,64 --variants m16,fma1,fma2 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_fma.log
timeout 300 python3 tools/fma_stream.py 2>&1 | tee $O/fma_stream.log
