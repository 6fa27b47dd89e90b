# Session 16, run 48: the exact-products kernels with the activation rows through registers (no
# FP8 ring: two programs an SM at 4 x 128 x 3): GPU tests, the GEMM core against FP8's and run
# 47's variants, the layer breakdown (fp8 / fp16-l1) at 1024 and 4096 tokens.
export PYTHONPATH=$PWD/src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT/r48; mkdir -p $O
t0=$(date +%s)
timeout -s KILL 200 python -m pytest -q -m gpu -x tests/test_prefill_wgmma.py -k "exact or far_apart" > $O/pytest_exact.log 2>&1
echo "== pytest exact ($(( $(date +%s) - t0 )) s)"; tail -n 4 $O/pytest_exact.log
timeout -s KILL 150 python tools/wgmma_prefill.py --tokens 4096 --variants 4x128x4,4x128x3e,4x128x2e,4x64x4e,8x128x2e > $O/core.log 2>&1
echo "== core ($(( $(date +%s) - t0 )) s)"; tail -n 12 $O/core.log
for shape in v4-flash gpt-oss-120b; do
  for m in fp8 fp16-l1; do
    timeout -s KILL 80 python -m megamoe.bench.breakdown --shape $shape --tokens 1024,4096 --mma $m > $O/bd_${shape}_$m.log 2>&1
    echo "== $shape $m ($(( $(date +%s) - t0 )) s)"; tail -n 3 $O/bd_${shape}_$m.log
  done
done
tar czf $OUT/r48.tgz -C $OUT r48
