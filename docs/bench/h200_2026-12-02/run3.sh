#!/usr/bin/env bash
# Device call 3 (one H200): where FMA tiles beat the MMA decode tiles (1-32 tokens), with and without
# loading a step ahead; then `megamoe bench` at the decode sizes with the new heuristic (torch in the same run).
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
BD="python3 -m megamoe.bench.breakdown"
( timeout 200 $BD --tokens 1,2,4,8,16,32 --variants m16,fma1,fma1s2,fma2
  timeout 200 $BD --shape gpt-oss-120b --tokens 1,2,4,8,16,32 --variants m16,fma1,fma1s2,fma2 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_fma.log
