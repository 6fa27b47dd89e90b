# Session 18, run 61: v20 (exact GEMMs on `_gemm_t` from 3 rows an expert): the GPU tests of the
# exact kernels, the layer's stages fp8 / fp16-l1 / fp16 from 64 to 4096 tokens, and `_gemm_t`'s
# narrow shape at 256 and 512 tokens.
export PYTHONPATH=$PWD/src
O=$OUT/r61; mkdir -p $O
t0=$(date +%s)
el() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
timeout -s KILL 150 python -m pytest -q -m gpu tests/test_prefill_wgmma.py -k "exact or three_rows or far_apart" > $O/pytest.log 2>&1
el pytest; tail -n 4 $O/pytest.log
for shape in v4-flash gpt-oss-120b; do
  timeout -s KILL 150 python docs/bench/h200_2026-12-03/exact_narrow_ab.py $shape 64,128,256,512,1024,2048,4096 layer > $O/layer_$shape.log 2>&1
  el "layer $shape"; tail -n 9 $O/layer_$shape.log
done
for shape in v4-flash gpt-oss-120b; do
  timeout -s KILL 80 python docs/bench/h200_2026-12-03/exact_narrow_ab.py $shape 256,512 sweep > $O/sweep_$shape.log 2>&1
  el "sweep $shape"; tail -n 13 $O/sweep_$shape.log | head -n 7
done
tar czf $OUT/r61.tgz -C $OUT r61
