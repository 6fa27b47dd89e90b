# Session 17, run 57: the CUDA IPC fix (one share per peer, comm/symm.py) after run 56's crash of
# a rank at EP = 4 on one GPU (finding 7): the new GPU test (rank 0's memory stays mapped until
# its last peer releases it) and the shared-GPU pressure tests at 2 and 4 ranks; the crashed
# chunk (EP = 4, iterations 552-751) again; iteration 295 (run 56's contract failure, finding 6)
# replayed with FP8 and with exact products in L1.
export PYTHONPATH=$PWD/src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT/r57; mkdir -p $O
t0=$(date +%s)
el() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
timeout -s KILL 200 python -m pytest -q -m gpu tests/test_ep_symm.py tests/test_stress.py -k "keep_a_peer or sharing_one_gpu" > $O/pytest.log 2>&1
el pytest; tail -n 3 $O/pytest.log
SHARE_GPU=1 START=552 ITERATIONS=200 COPIES=4 timeout 250 tools/gpu_reliability.sh stress-ep4 $O/c552 > /dev/null 2>&1
el chunk552; for f in $O/c552/*-?.log; do grep -E "failures:|max relative" $f | tail -n 2 | tr '\n' ' '; echo; done
for mma in fp8 fp16-l1; do
  timeout -s KILL 100 python -m megamoe.cli stress --ranks 4 --share-gpu --start 295 --iterations 1 --mma $mma --deadline 90 > $O/replay295_$mma.log 2>&1
  el "replay 295 $mma"; grep -E "failures:|max relative|contract" $O/replay295_$mma.log | head -n 3
done
tar czf $OUT/r57.tgz -C $OUT r57 && rm -rf $O
