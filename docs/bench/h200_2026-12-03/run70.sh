# Session 19, run 70: more pressure on the new default (mma="fp16-l1", v22) with the ranks
# sharing the GPU (symm over CUDA IPC): EP = 2 iterations 600-999, EP = 4 iterations 200-399.
export PYTHONPATH=$PWD/src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT/r70; mkdir -p $O
t0=$(date +%s)
el() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
SHARE_GPU=1 START=600 ITERATIONS=400 COPIES=4 timeout 270 tools/gpu_reliability.sh stress-ep2 $O/ep2 > /dev/null 2>&1
el "ep2 600-999"; for f in $O/ep2/stress-ep2*.log; do grep -E "failures:|max relative" $f | tail -n 2 | tr '\n' ' '; echo; done
SHARE_GPU=1 START=200 ITERATIONS=200 COPIES=4 timeout 200 tools/gpu_reliability.sh stress-ep4 $O/ep4 > /dev/null 2>&1
el "ep4 200-399"; for f in $O/ep4/stress-ep4*.log; do grep -E "failures:|max relative" $f | tail -n 2 | tr '\n' ' '; echo; done
cat $O/ep2/summary.txt $O/ep4/summary.txt
tar czf $OUT/r70.tgz -C $OUT r70 && rm -rf $O
