# Session 19, run 72: more pressure on the new default (mma="fp16-l1", v22) with the ranks
# sharing the GPU (symm over CUDA IPC): EP = 4 iterations 800-999.
export PYTHONPATH=$PWD/src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT/r72; mkdir -p $O
t0=$(date +%s)
el() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
SHARE_GPU=1 START=800 ITERATIONS=200 COPIES=4 timeout 170 tools/gpu_reliability.sh stress-ep4 $O/ep4 > /dev/null 2>&1
el "ep4 800-999"; for f in $O/ep4/stress-ep4*.log; do grep -E "failures:|max relative" $f | tail -n 2 | tr '\n' ' '; echo; done
tar czf $OUT/r72.tgz -C $OUT r72 && rm -rf $O
