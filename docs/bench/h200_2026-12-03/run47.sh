# Session 16, run 47: the exact-products Gluon prefill kernels (EXACT): GPU tests, the GEMM core's
# variants against FP8's in the same call, and the layer breakdown at 4096 tokens against the
# previous tree (fp16-l1's L1 on the Triton FP16 tiles) in the same call.
export PYTHONPATH=$PWD/src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT/r47; mkdir -p $O
t0=$(date +%s)
timeout -s KILL 200 python -m pytest -q -m gpu -x tests/test_prefill_wgmma.py -k "exact or far_apart" > $O/pytest_exact.log 2>&1
echo "== pytest exact ($(( $(date +%s) - t0 )) s)"; tail -n 4 $O/pytest_exact.log
timeout -s KILL 150 python tools/wgmma_prefill.py --tokens 4096 --variants 4x128x4,4x128x3e,4x64x3e,4x64x4e,4x128x2e,8x128x2e > $O/core.log 2>&1
echo "== core ($(( $(date +%s) - t0 )) s)"; tail -n 16 $O/core.log
for m in fp8 fp16-l1; do
  timeout -s KILL 60 python -m megamoe.bench.breakdown --shape v4-flash --tokens 4096 --mma $m > $O/bd_new_$m.log 2>&1
  echo "== new $m ($(( $(date +%s) - t0 )) s)"; tail -n 3 $O/bd_new_$m.log
done
PYTHONPATH=$PWD/base_0ac1a61/src timeout -s KILL 60 python -m megamoe.bench.breakdown --shape v4-flash --tokens 4096 --mma fp16-l1 > $O/bd_old_fp16-l1.log 2>&1
echo "== old fp16-l1 ($(( $(date +%s) - t0 )) s)"; tail -n 3 $O/bd_old_fp16-l1.log
timeout -s KILL 170 python -m pytest -q -m gpu tests/test_prefill_wgmma.py::test_prefill_kernels_match_reference_and_triton_tiles \
  tests/test_prefill_wgmma.py::test_bias_clamp_gpt_oss_activation_and_fp32_scales tests/test_prefill_wgmma.py::test_prefill_kernels_capture_in_a_cuda_graph \
  tests/test_gpu.py::test_exact_l1_products_keep_every_token_within_the_contract tests/test_stress.py::test_pressure_with_ranks_sharing_one_gpu > $O/pytest_rest.log 2>&1
echo "== pytest rest ($(( $(date +%s) - t0 )) s)"; tail -n 4 $O/pytest_rest.log
tar czf $OUT/r47.tgz -C $OUT r47
