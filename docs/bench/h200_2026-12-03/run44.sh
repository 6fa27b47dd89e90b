# Session 15, run 3: the cost of exact products in L1 (mma="fp16-l1") and in both GEMMs, against FP8
# MMAs in the same call; then EP = 2 / 4 pressure with ranks sharing the GPU.
export PYTHONPATH=$PWD/src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT/r3; mkdir -p $O
t0=$(date +%s)
for shape in v4-flash gpt-oss-120b; do
  for m in fp8 fp16-l1 fp16; do
    timeout -s KILL 150 python -m megamoe.bench.breakdown --shape $shape --tokens 64,1024,4096 --mma $m \
      > $O/breakdown_${shape}_$m.log 2>&1
    echo "== $shape $m ($(( $(date +%s) - t0 )) s)"; tail -n 3 $O/breakdown_${shape}_$m.log
  done
  [ $(( $(date +%s) - t0 )) -gt 330 ] && break
done
t1=$(date +%s)
SHARE_GPU=1 COPIES=4 ITERATIONS=64 START=40 timeout -s KILL 170 tools/gpu_reliability.sh stress-ep2 $O/p > /dev/null 2>&1 &
SHARE_GPU=1 COPIES=3 ITERATIONS=36 START=20 timeout -s KILL 170 tools/gpu_reliability.sh stress-ep4 $O/p > /dev/null 2>&1 &
wait
echo "pressure took $(( $(date +%s) - t1 )) s"
for f in $O/p/stress-ep*.log; do echo "== $f"; grep -E "^iterations|failures:|max relative" $f | tail -n 3; done
tar czf $OUT/r3.tgz -C $OUT r3
