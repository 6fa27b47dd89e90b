# Session 16, run 49: the exact-products tests on `_gemm_t` in the layer (8 warps, 128 weight rows, 3 stages), then
# `_gemm_t` (activations as the FP16 register operand, decoded weights the shared one) against
# FP8 and the FP8-ring exact core in the same call; the layer breakdown (fp8 / fp16-l1) at 1024 and 4096 tokens.
export PYTHONPATH=$PWD/src
O=$OUT/r49; mkdir -p $O
t0=$(date +%s)
timeout -s KILL 200 python -m pytest -q -m gpu -x tests/test_prefill_wgmma.py tests/test_gpu.py -k "exact or far_apart" > $O/pytest_exact.log 2>&1
echo "== pytest exact ($(( $(date +%s) - t0 )) s)"; tail -n 4 $O/pytest_exact.log
timeout -s KILL 200 python tools/wgmma_prefill.py --tokens 4096 --variants 4x128x4,8x128x2e,8x128x3t,8x128x2t,4x128x2t,4x64x3t,4x128x3t > $O/core.log 2>&1
echo "== core ($(( $(date +%s) - t0 )) s)"; grep check $O/core.log; tail -n 16 $O/core.log
for shape in v4-flash gpt-oss-120b; do
  for m in fp8 fp16-l1; do
    timeout -s KILL 80 python -m megamoe.bench.breakdown --shape $shape --tokens 1024,4096 --mma $m > $O/bd_${shape}_$m.log 2>&1
    echo "== $shape $m ($(( $(date +%s) - t0 )) s)"; tail -n 2 $O/bd_${shape}_$m.log
  done
done
tar czf $OUT/r49.tgz -C $OUT r49
