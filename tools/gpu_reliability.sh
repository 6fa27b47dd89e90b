#!/usr/bin/env bash
# The GPU-only runs of issue 6 (docs/RELIABILITY.md says what each checks).
#
#   tools/gpu_reliability.sh STEP [OUT_DIR]      OUT_DIR defaults to reliability_out
#
# One step per command, each under `timeout` (the device tool allows 10 minutes a command):
#
#   stress-ep1   1000 random cases at EP = 1 against the reference        (1 GPU)
#   stress-ep2   1000 random cases at EP = 2                               (2 GPUs)
#   stress-ep4   1000 random cases at EP = 4                               (4 GPUs)
#   faults-2     every fault scenario on 2 ranks                           (2 GPUs)
#   faults-4     every fault scenario on 4 ranks                           (4 GPUs)
#   (EP_BACKEND=symm|nccl picks the buffers' backend of these four; default auto, i.e. symm)
#   graphs       4 batch sizes captured on one buffer, 10000 replays, every 100th against eager
#   graphs-prefill  the same with batches of 1, 64, 1024 and 4096 tokens over 32 experts (the
#                last two take the prefill tiles: on Hopper the Gluon kernels)
#   large        cases past 2^31 elements (x, combine rows, y) against the reference  (1 GPU, up to ~30 GB)
#   memcheck     compute-sanitizer memcheck on a few tiny random cases (1 GPU)
#   racecheck    compute-sanitizer racecheck on the same
#   (SANITIZE_PROFILE=prefill: the two on batches that take the prefill tiles instead;
#    SANITIZE_ITERATIONS: how many iterations, default 6 and 4)
#   pytest       the gpu-marked tests of tests/test_stress.py
#
# Each step writes OUT_DIR/STEP.log (and .json where there is one) and appends its exit status
# to OUT_DIR/summary.txt. A compiled GPU iteration takes about 0.6-0.7 s at EP = 1 and 0.9 s at
# EP = 2 (2026-11-28); the first ones compile kernels.
#
# The stress steps take START (first iteration, default 0) and GPUS (default: the step's rank
# count). With GPUS a multiple of the ranks they run GPUS / ranks copies side by side on
# disjoint GPUs (CUDA_VISIBLE_DEVICES), copy i on iterations START + i * chunk ..., each writing
# OUT_DIR/STEP-i.log and .json, e.g. 1000 EP = 1 cases on a 4-GPU machine in about 3 minutes:
#     GPUS=4 tools/gpu_reliability.sh stress-ep1
# COPIES (default GPUS / ranks) runs more copies than GPU sets, round robin: the iterations are
# mostly CPU work (reference, checks, compiles), so several copies share one GPU, e.g.
#     COPIES=8 ITERATIONS=800 tools/gpu_reliability.sh stress-ep1
# MMA=fp8 or fp16 runs them (and memcheck, racecheck, graphs, large) on that `--mma` instead of the
# default fp16-l1 (exact products in L1).
# SHARE_GPU=1 puts each copy's ranks of stress-ep2/ep4 on one GPU (`--share-gpu`: processes on
# one device, the buffers over symm through CUDA IPC), for a machine with fewer GPUs than ranks:
#     SHARE_GPU=1 COPIES=4 tools/gpu_reliability.sh stress-ep4
set -u

STEP=${1:?usage: tools/gpu_reliability.sh STEP [OUT_DIR]}
OUT=${2:-reliability_out}
ITERATIONS=${ITERATIONS:-1000}
START=${START:-0}
PROFILE=${PROFILE:-gpu}
EP_BACKEND=${EP_BACKEND:-auto}
MMA=${MMA:-fp16-l1}   # the steps' --mma (the library's default; fp8, fp16)
FAULTS=mismatched_capacity,late_half,late_double,killed_counts,killed_dispatch,killed_combine
[ "$EP_BACKEND" = symm ] && FAULTS=$FAULTS,killed_gather   # a peer dies while the others pull its rows
mkdir -p "$OUT"
# The working tree's package, installed or not.
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
MEGAMOE="python -m megamoe.cli"
# DESIGN.md section 8: NVLink multicast stays off.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1

run() {   # run LIMIT_S COMMAND...: bounded, logged, status recorded
    local limit=$1
    shift
    echo "== $STEP: $*" | tee "$OUT/$STEP.log"
    timeout --signal=KILL "$limit" "$@" >> "$OUT/$STEP.log" 2>&1
    local status=$?
    echo "$STEP: exit $status ($(date -u +%FT%TZ))" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$STEP.log"
    return $status
}

chunks() {   # chunks RANKS ARGS...: `megamoe stress ARGS` in GPUS / RANKS copies side by side
    local ranks=$1
    shift
    if [ "${SHARE_GPU:-0}" = 1 ] && [ "$ranks" -gt 1 ]; then
        set -- "$@" --share-gpu   # the copy's ranks all on its one GPU
        ranks=1
    fi
    local sets=$(( ${GPUS:-$ranks} / ranks ))
    [ "$sets" -ge 1 ] || sets=1
    local copies=${COPIES:-$sets}
    local per=$(( (ITERATIONS + copies - 1) / copies ))
    local pids=() i
    for ((i = 0; i < copies; i++)); do
        local devices
        devices=$(seq -s, $((i % sets * ranks)) $((i % sets * ranks + ranks - 1)))
        echo "== $STEP-$i (GPUs $devices): stress $* --start $((START + i * per)) --iterations $per" \
            | tee "$OUT/$STEP-$i.log"
        CUDA_VISIBLE_DEVICES=$devices timeout --signal=KILL 570 $MEGAMOE stress "$@" --profile "$PROFILE" --mma "$MMA" \
            --start $((START + i * per)) --iterations "$per" --json "$OUT/$STEP-$i.json" >> "$OUT/$STEP-$i.log" 2>&1 &
        pids+=($!)
    done
    local status=0 pid
    for pid in "${pids[@]}"; do
        wait "$pid" || status=$?
    done
    echo "$STEP: exit $status, $copies copies from iteration $START ($(date -u +%FT%TZ))" | tee -a "$OUT/summary.txt"
    for ((i = 0; i < copies; i++)); do
        tail -n 12 "$OUT/$STEP-$i.log"
    done
    return $status
}

if [ "$STEP" = memcheck ] || [ "$STEP" = racecheck ]; then
    SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    if [ -z "$SANITIZER" ]; then
        echo "$STEP: compute-sanitizer not found (PATH, /usr/local/cuda*/bin)" | tee -a "$OUT/summary.txt"
        exit 2
    fi
fi

case "$STEP" in
    stress-ep1) chunks 1 ;;
    stress-ep2) chunks 2 --ranks 2 --deadline 540 --ep-backend "$EP_BACKEND" ;;
    stress-ep4) chunks 4 --ranks 4 --deadline 540 --ep-backend "$EP_BACKEND" ;;
    faults-2) run 570 $MEGAMOE stress --faults --ranks 2 --timeout 10 --ep-backend "$EP_BACKEND" \
        --scenarios "$FAULTS" --json "$OUT/$STEP-$EP_BACKEND.json" ;;
    faults-4) run 570 $MEGAMOE stress --faults --ranks 4 --timeout 10 --ep-backend "$EP_BACKEND" \
        --scenarios "$FAULTS" --json "$OUT/$STEP-$EP_BACKEND.json" ;;
    graphs) run 570 $MEGAMOE stress --graphs --replays 10000 --check-every 100 --mma "$MMA" --json "$OUT/$STEP.json" ;;
    graphs-prefill) run 570 $MEGAMOE stress --graphs --replays 10000 --check-every 100 --batch-sizes 1,64,1024,4096 \
        --experts 32 --mma "$MMA" --json "$OUT/$STEP.json" ;;
    large) run 570 $MEGAMOE stress --large --mma "$MMA" --json "$OUT/$STEP.json" ;;
    memcheck)
        # No caching allocator: each tensor is its own allocation, so memcheck sees overruns between
        # tensors. (The buffer's regions share one allocation: an overrun from one region into the
        # next is invisible to it; the stress checks' results catch those.)
        run 570 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 99 \
            --print-limit 50 $MEGAMOE stress --iterations "${SANITIZE_ITERATIONS:-6}" --profile "${SANITIZE_PROFILE:-tiny}" \
            --mma "$MMA" --device cuda ;;
    racecheck)
        run 570 "$SANITIZER" --tool racecheck --racecheck-report all --error-exitcode 99 --print-limit 50 \
            $MEGAMOE stress --iterations "${SANITIZE_ITERATIONS:-4}" --profile "${SANITIZE_PROFILE:-tiny}" --mma "$MMA" \
            --device cuda ;;
    pytest) run 570 python -m pytest -q -m gpu tests/test_stress.py ;;
    *) echo "unknown step $STEP (see the header of $0)"; exit 2 ;;
esac
