#!/usr/bin/env bash
# Device call 3 (4 x H200): expert parallelism on the final configuration (v12), the NCCL
# backend's pressure test past iteration 300, the exact-products pressure test, and wider
# prefill tiles now that their promotion is cheaper.
set -u
export PYTHONPATH=src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
s=$(date +%s)
timeout 200 python3 -m megamoe.cli bench --ep 4 --out $O/ep4 > $O/ep4.log 2>&1
echo "== ep 4 rc=$? $(( $(date +%s) - s )) s"; grep -A40 "tokens  rank" $O/ep4.log | grep " max \|target\|met\|symm" | head -20
s=$(date +%s)
( CUDA_VISIBLE_DEVICES=2,3 EP_BACKEND=nccl START=300 ITERATIONS=150 tools/gpu_reliability.sh stress-ep2 $O/rel > $O/nccl_stress.out 2>&1 ) &
sp=$!
CUDA_VISIBLE_DEVICES=0,1 timeout 170 python3 -m megamoe.cli bench --ep 2 --out $O/ep2 > $O/ep2.log 2>&1
echo "== ep 2 rc=$? $(( $(date +%s) - s )) s"; grep -A40 "tokens  rank" $O/ep2.log | grep " max \|target\|met\|symm" | head -20
wait $sp; echo "== nccl stress $(( $(date +%s) - s )) s"; tail -n 6 $O/nccl_stress.out
s=$(date +%s)
( CUDA_VISIBLE_DEVICES=2 timeout 150 python3 -m megamoe.cli stress --start 0 --iterations 150 --profile gpu --mma fp16 --json $O/stress_fp16_0.json > $O/stress_fp16_0.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=3 timeout 150 python3 -m megamoe.cli stress --start 150 --iterations 150 --profile gpu --mma fp16 --json $O/stress_fp16_150.json > $O/stress_fp16_150.log 2>&1 ) &
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m megamoe.bench.breakdown --tokens 4096 --variants default,m128,m64n128,m64s4 > $O/tiles_v4.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m megamoe.bench.breakdown --shape gpt-oss-120b --tokens 4096 --variants default,m128,m64n128,m64s4 > $O/tiles_gptoss.log 2>&1
wait; echo "== phase 3 $(( $(date +%s) - s )) s"
grep -v "^$" $O/tiles_v4.log $O/tiles_gptoss.log | sort -u | grep -v "^.*shape " 
tail -n 5 $O/stress_fp16_0.log $O/stress_fp16_150.log
