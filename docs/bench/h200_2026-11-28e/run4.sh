#!/usr/bin/env bash
set -u
export PYTHONPATH=src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT
START=700 ITERATIONS=300 tools/gpu_reliability.sh stress-ep4 $O/rel 2>&1 | tail -14
for pdl in 1 0; do
  echo "== ep_breakdown PDL=$pdl"
  MEGAMOE_PDL=$pdl timeout 120 python3 tools/ep_breakdown.py --ranks 2 --tokens 1,64 > $O/ep_breakdown_pdl$pdl.log 2>&1; echo rc=$?
  tail -n 30 $O/ep_breakdown_pdl$pdl.log | grep -v "^$"
done
