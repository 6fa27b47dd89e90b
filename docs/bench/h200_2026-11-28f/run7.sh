#!/usr/bin/env bash
# Device call 7 (one H200): one-tile GEMMs whose grid is less than one wave launched without PDL
# (working tree) against v12 (d86ebfa carried), same run; then the GPU tests.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
BD="python3 -m megamoe.bench.breakdown"
( for r in 1 2; do
  tools/ab_trees.sh run timeout 60 $BD --shape gpt-oss-120b --tokens 1,8,64
  tools/ab_trees.sh run timeout 60 $BD --tokens 1,8,64
done ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/small_grid_pdl.log
timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py tests/test_layer.py 2>&1 | tail -3 | tee $O/pytest_gpu.log
