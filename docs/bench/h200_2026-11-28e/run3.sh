#!/usr/bin/env bash
set -u
export PYTHONPATH=src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt
for ep in 4 2; do for pdl in 1 0; do
  s=$(date +%s)
  MEGAMOE_PDL=$pdl timeout 140 python3 -m megamoe.cli bench --ep $ep --backends symm --baselines ep1 --out $O/ep${ep}_pdl$pdl > $O/ep${ep}_pdl$pdl.log 2>&1
  echo "== ep $ep PDL=$pdl rc=$? $(( $(date +%s) - s )) s"; grep -A12 "symm / floor\|symm/floor\|tokens per rank" $O/ep${ep}_pdl$pdl.log | tail -8
done; done
