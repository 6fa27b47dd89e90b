"""Bounded waits on torch.distributed collectives: nothing in megamoe waits forever.

Every collective megamoe issues is started with async_op=True and finished with `wait_for`,
which blocks the host for at most MEGAMOE_TIMEOUT_S seconds (`megamoe.env`). A rank that never
reaches the matching collective therefore makes the others raise TimeoutError instead of
hanging; the process group is unusable after that, as after any failed collective.
"""

from __future__ import annotations

from datetime import timedelta

from .. import env


def wait_for(work, what: str) -> None:
    """Block until `work` (a torch.distributed Work) completes, at most MEGAMOE_TIMEOUT_S seconds.

    what: the collective and the rank, for the error message.
    Raises TimeoutError past the timeout, RuntimeError (naming `what`) if the collective failed.
    """
    timeout = env.timeout_s()
    try:
        done = work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as err:
        # gloo says "Operation timed out!", NCCL "... timed out" or "Timeout": both are timeouts.
        if "timed out" in str(err).lower() or "timeout" in str(err).lower():
            raise _timeout(what, timeout) from err
        raise RuntimeError(f"{what}: the collective failed: {err}") from err
    if done is False:
        raise _timeout(what, timeout)


def _timeout(what: str, timeout: float) -> TimeoutError:
    return TimeoutError(f"{what}: not complete after {timeout:g} s (MEGAMOE_TIMEOUT_S); another rank of the "
                        "group may have failed or never reached this call")
