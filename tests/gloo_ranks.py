"""Run a function on R ranks of a fresh process group, one spawned process per rank.

For the expert-parallel tests: gloo on the CPU (nccl on GPUs). The ranks meet through a file
in a fresh directory, never a port. Each worker dumps its stacks and exits if it runs past the
deadline, and the parent kills any worker still alive at the deadline, so a failing or hung
test never hangs the suite. Workers hand back their return value (tensors, lists, dicts,
strings, numbers) through a file; an exception in any worker fails the call with every
worker's traceback.

Environment variables the workers need before importing triton or megamoe (TRITON_INTERPRET)
are passed in `env`: a spawned process reads them at start.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from megamoe.stress import environ_override

DEADLINE_S = 150
"""Most seconds a run_ranks call may take, start-up of every rank included."""


def run_ranks(fn, num_ranks: int, *args, workdir: Path, env: dict[str, str] | None = None,
              backend: str = "gloo", deadline_s: float = DEADLINE_S) -> list:
    """fn(rank, num_ranks, group, *args) on each rank; returns the values in rank order.

    fn must be a module-level function (spawn pickles it by name). workdir: an empty
    directory for the rendezvous file and the results.
    """
    ctx = multiprocessing.get_context("spawn")
    init_file = workdir / "rendezvous"
    outs = [workdir / f"rank{r}.pt" for r in range(num_ranks)]
    procs = [ctx.Process(target=_worker, args=(fn, r, num_ranks, backend, str(init_file), args, str(outs[r]),
                                               deadline_s), daemon=True)
             for r in range(num_ranks)]
    with environ_override(env or {}):
        for p in procs:
            p.start()
    end = time.monotonic() + deadline_s + 5
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    errors, values = [], []
    for rank, (p, out) in enumerate(zip(procs, outs)):
        if p.is_alive():
            p.kill()
            p.join()
            errors.append(f"rank {rank}: still running after {deadline_s} s; killed")
        elif not out.exists():
            errors.append(f"rank {rank}: exited with code {p.exitcode} and no result (see its stderr)")
        else:
            result = torch.load(out)
            if "error" in result:
                errors.append(f"rank {rank}:\n{result['error']}")
            else:
                values.append(result["value"])
    if errors:
        raise AssertionError("worker ranks failed:\n" + "\n".join(errors))
    return values


def _worker(fn, rank, num_ranks, backend, init_file, args, out, deadline_s):
    faulthandler.dump_traceback_later(deadline_s, exit=True)
    # The ranks share few cores: one thread each keeps them from starving one another.
    torch.set_num_threads(1)
    from megamoe import env

    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=num_ranks,
                                timeout=timedelta(seconds=env.timeout_s()))
        result = {"value": fn(rank, num_ranks, dist.group.WORLD, *args)}
    except BaseException:  # noqa: BLE001 - everything goes back to the parent, which fails the test
        result = {"error": traceback.format_exc()}
    torch.save(result, out)
    sys.stdout.flush()
    sys.stderr.flush()
    # No process-group teardown: after a timed-out collective it may block on the missing peer.
    os._exit(0)


