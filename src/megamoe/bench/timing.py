"""GPU timing and the device's measured ceilings (copy bandwidth, dense matmul rates).

Calls are timed as CUDA-graph replays with CUDA events: warm up eagerly, capture `calls`
(a list of closures, usually one per rotating input set so that repeated runs do not read
the same experts from L2), replay the graph several times and take the median per call.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch


def time_graph(calls, replays: int = 10, min_calls: int = 20) -> float:
    """Median microseconds per call over CUDA-graph replays of all `calls` in sequence."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up: compilation, autotuning, allocator pools
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    sequence = list(calls) * max(1, -(-min_calls // len(calls)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in sequence:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / len(sequence))
    del graph
    return statistics.median(times)


def time_eager(calls, reps: int = 5) -> float:
    """Median microseconds per call, run eagerly (for paths that synchronise with the host)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in calls:
            call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / len(calls))
    return statistics.median(times)


@dataclass(frozen=True)
class DeviceCeilings:
    name: str
    copy_gbps: float          # device-to-device copy, bytes read + written per second / 1e9
    fp8_tflops: float         # dense torch._scaled_mm 8192^3
    bf16_tflops: float        # dense torch.matmul 8192^3


def _copy_gbps(device, nbytes: int = 1 << 31) -> float:
    """Device-to-device copy bandwidth, bytes read + written; the buffers are freed on return."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_eager([lambda: dst.copy_(src)], reps=10) / 1e3


def measure_ceilings(device=None) -> DeviceCeilings:
    device = torch.device(device or "cuda")
    copy_gbps = _copy_gbps(device)
    n = 8192
    a = torch.randn(n, n, device=device).bfloat16()
    b = torch.randn(n, n, device=device).bfloat16()
    bf16_us = time_eager([lambda: a @ b], reps=10)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).T
    one = torch.ones((), device=device)
    fp8_us = time_eager([lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16, use_fast_accum=True)],
                        reps=10)
    flops = 2 * n ** 3
    return DeviceCeilings(torch.cuda.get_device_name(device), copy_gbps,
                          flops / fp8_us / 1e6, flops / bf16_us / 1e6)
