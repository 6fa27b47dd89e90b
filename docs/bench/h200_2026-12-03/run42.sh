# Session 15, run 1: ranks sharing one GPU (--share-gpu); finding 6 replays; EP=1 --mma fp16 200-999.
export PYTHONPATH=$PWD/src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=$OUT/r1; mkdir -p $O
nvidia-smi --query-gpu=name,compute_mode,driver_version --format=csv > $O/gpu.txt 2>&1
git log -1 --format=%H > $O/commit.txt 2>/dev/null
t0=$(date +%s)
for spec in "2 397" "2 641" "4 498" "4 295"; do
  set -- $spec
  for m in fp8 fp16; do
    timeout -s KILL 200 python -m megamoe.cli stress --ranks $1 --share-gpu --start $2 --iterations 1 --profile gpu \
      --mma $m --deadline 180 --json $O/replay_$2_$m.json > $O/replay_$2_$m.log 2>&1 &
  done
  [ $1 = 2 ] && [ $2 = 641 ] && wait
done
wait
echo "replays took $(( $(date +%s) - t0 )) s" | tee $O/times.txt
for f in $O/replay_*.log; do echo "== $f"; tail -n 6 $f; done
START=200 ITERATIONS=800 COPIES=8 MMA=fp16 timeout -s KILL 330 tools/gpu_reliability.sh stress-ep1 $O/fp16 > /dev/null 2>&1
echo "fp16 took $(( $(date +%s) - t0 )) s total" | tee -a $O/times.txt
for f in $O/fp16/stress-ep1-*.log; do tail -n 3 $f; done
tar czf $OUT/r1.tgz -C $OUT r1
