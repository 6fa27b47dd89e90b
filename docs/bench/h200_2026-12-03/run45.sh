# Session 15, run 4: the new GPU tests (mma="fp16-l1" per token and in the kernel cases; ranks sharing the GPU).
export PYTHONPATH=$PWD/src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT/r4; mkdir -p $O
t0=$(date +%s)
timeout -s KILL 125 python -m pytest -q tests/test_gpu.py tests/test_stress.py tests/test_kernels.py \
  -k "exact_l1 or sharing_one_gpu or fp16-l1" > $O/pytest.log 2>&1
tail -n 8 $O/pytest.log
echo "pytest took $(( $(date +%s) - t0 )) s"
