# Session 18, run 64: exact `_gemm` (v21 candidate: weights the wgmma's M side, 16-64 tokens the
# N side, both operands FP16 in shared memory) for the exact GEMMs at few rows an expert: the GPU
# tests that take it (8 and 10 rows an expert; 24 and 48 stay on `_gemm_t`), then fp16-l1's L1
# on it against v20's `_gemm_t` and FP8 at 128-1024 tokens.
export PYTHONPATH=$PWD/src
O=$OUT/r64; mkdir -p $O
t0=$(date +%s)
el() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
timeout -s KILL 120 python -m pytest -q -m gpu tests/test_prefill_wgmma.py -k "three_rows" > $O/pytest.log 2>&1
el pytest; tail -n 3 $O/pytest.log
for shape in v4-flash gpt-oss-120b; do
  timeout -s KILL 150 python docs/bench/h200_2026-12-03/exact_narrow_ab.py $shape 128,256,512,1024 small > $O/small_$shape.log 2>&1
  el "small $shape"; tail -n 9 $O/small_$shape.log
done
tar czf $OUT/r64.tgz -C $OUT r64
