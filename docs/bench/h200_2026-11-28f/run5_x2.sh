#!/usr/bin/env bash
# Device call 5 (2 x H200; no 4-GPU machine was lent this session): EP = 2 on the final
# configuration (v12), the 2-rank killed_gather fault, the GPU replays of EP = 2 iterations 397
# and 641 with FP8 and exact-product MMAs, and the NCCL backend's pressure test from 300.
set -u
export PYTHONPATH=src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
s=$(date +%s)
timeout 180 python3 -m megamoe.cli bench --ep 2 --out $O/ep2 > $O/ep2.log 2>&1
echo "== ep 2 rc=$? $(( $(date +%s) - s )) s"; sed -n '/tokens  rank/,$p' $O/ep2.log | grep " max \|tokens  rank\|target\|met" | head -20
s=$(date +%s)
timeout 90 python3 -m megamoe.cli stress --faults --ranks 2 --timeout 10 --ep-backend symm --scenarios killed_gather --json $O/killed_gather.json > $O/killed_gather.log 2>&1
echo "== killed_gather rc=$? $(( $(date +%s) - s )) s"; tail -n 8 $O/killed_gather.log
for it in 397 641; do for mma in fp8 fp16; do
  s=$(date +%s)
  timeout 60 python3 -m megamoe.cli stress --ranks 2 --start $it --iterations 1 --profile gpu --mma $mma > $O/replay_${it}_$mma.log 2>&1
  echo "== replay $it $mma rc=$? $(( $(date +%s) - s )) s"; grep "max relative\|failures\|FAIL" $O/replay_${it}_$mma.log | head -4
done; done
timeout 180 python3 -m megamoe.cli stress --ranks 2 --ep-backend nccl --start 300 --iterations 100 --profile gpu --deadline 300 --json $O/stress-ep2-nccl-300.json > $O/stress-ep2-nccl-300.log 2>&1
echo "== nccl stress rc=$?"; tail -n 8 $O/stress-ep2-nccl-300.log
