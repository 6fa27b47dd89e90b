# Session 19, run 68: pressure on v22 with the new default mma="fp16-l1": 1000 iterations at
# EP = 1 (8 copies on the GPU), then 200 at EP = 2 with the ranks sharing the GPU (symm over
# CUDA IPC; there L1's exact products run the Triton FP16 tiles).
export PYTHONPATH=$PWD/src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT/r68; mkdir -p $O
t0=$(date +%s)
el() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
START=0 ITERATIONS=1000 COPIES=8 timeout 280 tools/gpu_reliability.sh stress-ep1 $O/ep1 > /dev/null 2>&1
el "ep1 0-999"; for f in $O/ep1/stress-ep1*.log; do grep -E "failures:|max relative" $f | tail -n 2 | tr '\n' ' '; echo; done
SHARE_GPU=1 START=0 ITERATIONS=200 COPIES=4 timeout 260 tools/gpu_reliability.sh stress-ep2 $O/ep2 > /dev/null 2>&1
el "ep2 0-199"; for f in $O/ep2/stress-ep2*.log; do grep -E "failures:|max relative" $f | tail -n 2 | tr '\n' ' '; echo; done
cat $O/ep1/summary.txt $O/ep2/summary.txt
tar czf $OUT/r68.tgz -C $OUT r68 && rm -rf $O
