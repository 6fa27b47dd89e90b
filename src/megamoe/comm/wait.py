"""Bounded waits on torch.distributed collectives: nothing in megamoe waits forever.

Every collective megamoe issues is started with async_op=True and finished with `wait_for`,
which blocks the host for at most MEGAMOE_TIMEOUT_S seconds (`megamoe.env`). A rank that never
reaches the matching collective therefore makes the others raise TimeoutError instead of
hanging; the process group is unusable after that, as after any failed collective.

The waits of one call share one `Deadline`: MEGAMOE_TIMEOUT_S from the call's start bounds all
of them together, not each. A peer that dies inside a collective can leave some ranks with that
collective complete (a ring all_gather delivers its rows before it dies) and others not; with a
bound per wait, the first group then waited a second full timeout in the next collective (4 x
H200, 2026-11-28: one survivor raised after 20.5 s with MEGAMOE_TIMEOUT_S = 10).
"""

from __future__ import annotations

import math
import time
from datetime import timedelta

from .. import env


class Deadline:
    """MEGAMOE_TIMEOUT_S from now: the bound of every wait of one call."""

    # Past the deadline a wait still gets this long, so that a collective that has completed
    # meanwhile is taken rather than reported as timed out.
    MIN_WAIT_S = 1e-3

    def __init__(self):
        self.timeout = env.timeout_s()
        self.end = time.monotonic() + self.timeout

    def remaining(self) -> timedelta:
        """What is left, rounded up to whole milliseconds: the process groups take their timeout
        in milliseconds and drop the rest, which let a wait give up up to 1 ms before the
        deadline (seen in the CPU suite: a 2 s timeout raised after 1.999997 s)."""
        left = max(self.end - time.monotonic(), self.MIN_WAIT_S)
        return timedelta(milliseconds=math.ceil(left * 1000))


def wait_for(work, what: str, deadline: Deadline | None = None) -> None:
    """Block until `work` (a torch.distributed Work) completes, at most until `deadline` (default:
    MEGAMOE_TIMEOUT_S from now).

    what: the collective and the rank, for the error message.
    Raises TimeoutError past the deadline, RuntimeError (naming `what`) if the collective failed.
    """
    deadline = deadline or Deadline()
    timeout = deadline.timeout
    try:
        done = work.wait(timeout=deadline.remaining())
    except RuntimeError as err:
        # gloo says "Operation timed out!", NCCL "... timed out" or "Timeout": both are timeouts.
        if "timed out" in str(err).lower() or "timeout" in str(err).lower():
            raise _timeout(what, timeout) from err
        raise RuntimeError(f"{what}: the collective failed: {err}") from err
    if done is False:
        raise _timeout(what, timeout)


def _timeout(what: str, timeout: float) -> TimeoutError:
    return TimeoutError(f"{what}: not complete within {timeout:g} s (MEGAMOE_TIMEOUT_S) of the call's start; "
                        "another rank of the group may have failed or never reached this call")
