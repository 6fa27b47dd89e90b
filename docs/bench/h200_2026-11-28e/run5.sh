#!/usr/bin/env bash
set -u
export PYTHONPATH=src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT
( EP_BACKEND=nccl ITERATIONS=300 GPUS=2 tools/gpu_reliability.sh stress-ep2 $O/rel > $O/nccl_stress.out 2>&1 ) &
sp=$!
for v in 0 1; do
  CUDA_VISIBLE_DEVICES=2,3 X_PDL_PERSIST=$v timeout 100 python3 -m megamoe.cli bench --ep 2 --backends symm --baselines ep1 --tokens 1,8,64,128,4096 --out $O/ep2_persist$v > $O/ep2_persist$v.log 2>&1
  echo "== ep2 X_PDL_PERSIST=$v rc=$?"; grep " max " $O/ep2_persist$v.log
done
wait $sp; tail -n 14 $O/nccl_stress.out
