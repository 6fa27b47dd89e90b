# Session 19, run 66: v22 (a split exact GEMM's MMA launch on the Gluon exact `_gemm`): the GPU
# tests that take it and the exact kernels', then mix_ab.py: fp8 / v21 / v22 / v22 on 3 and 2
# ring stages, 32-512 tokens, both shapes.
export PYTHONPATH=$PWD/src
O=$OUT/r66; mkdir -p $O
t0=$(date +%s)
el() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
timeout -s KILL 150 python -m pytest -q -m gpu tests/test_prefill_wgmma.py \
  -k "split_exact or three_rows or exact_products" > $O/pytest.log 2>&1
el pytest; tail -n 4 $O/pytest.log
timeout -s KILL 60 python -m pytest -q tests/test_kernels.py -k "mixed_tiles or split_exact" > $O/pytest_kernels.log 2>&1
el "pytest kernels"; tail -n 4 $O/pytest_kernels.log
for shape in v4-flash gpt-oss-120b; do
  timeout -s KILL 170 python docs/bench/h200_2026-12-03/mix_ab.py $shape 32,64,128,256,512 > $O/mix_$shape.log 2>&1
  el "mix $shape"; tail -n 22 $O/mix_$shape.log
done
tar czf $OUT/r66.tgz -C $OUT r66
