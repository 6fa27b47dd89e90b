#!/usr/bin/env bash
# Final call (one GPU): GPU tests (PDL, L2 prefetch, mma="fp16"), then L2 prefetch on/off.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py tests/test_layer.py 2>&1 | tail -4 | tee $O/pytest_gpu.log
for shape in v4-flash:1,8,64 gpt-oss-120b:1,8; do for pf in True False; do
  echo "== ${shape%%:*} L2_PREFETCH=$pf"
  timeout 60 python3 -c "
import sys; import megamoe.experts as e; e.L2_PREFETCH = $pf
from megamoe.bench.breakdown import main; main(['--shape', '${shape%%:*}', '--tokens', '${shape##*:}'])" 2>&1 | grep -v "^$" | awk '!seen[\$0]++'
done; done 2>&1 | tee $O/breakdown_prefetch.log
