# Session 19, run 71: more pressure on the new default (mma="fp16-l1", v22) with the ranks
# sharing the GPU (symm over CUDA IPC): EP = 4 iterations 400-799.
export PYTHONPATH=$PWD/src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT/r71; mkdir -p $O
t0=$(date +%s)
el() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
SHARE_GPU=1 START=400 ITERATIONS=400 COPIES=4 timeout 300 tools/gpu_reliability.sh stress-ep4 $O/ep4 > /dev/null 2>&1
el "ep4 400-799"; for f in $O/ep4/stress-ep4*.log; do grep -E "failures:|max relative" $f | tail -n 2 | tr '\n' ' '; echo; done
tar czf $OUT/r71.tgz -C $OUT r71 && rm -rf $O
