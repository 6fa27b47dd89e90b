#!/usr/bin/env bash
# Device call 1 (one GPU): PDL / one-program plan / BF16-MMA experiment, same run.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $O/gpu.txt
date -u | tee -a $O/gpu.txt
BD="python3 -m megamoe.bench.breakdown"
( echo "== v10 (e4f3283)"; PYTHONPATH=build/trees/e4f3283/src timeout 130 $BD --tokens 1,8,64,4096
  echo "== HEAD + PDL off (one-program plan)"; MEGAMOE_PDL=0 timeout 130 $BD --tokens 1,8,64,4096
  echo "== HEAD + PDL on"; timeout 130 $BD --tokens 1,8,64,4096
  echo "== HEAD + PDL on + MMA bf16"; MEGAMOE_MMA=bf16 timeout 130 $BD --tokens 1,8,64,4096 ) 2>&1 | tee $O/breakdown_v4.log | grep -v "^$"
timeout 60 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py tests/test_layer.py 2>&1 | tail -5 | tee $O/pytest_gpu.log
