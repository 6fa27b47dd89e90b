"""Every environment variable megamoe reads, with its default. The README lists them too.

MEGAMOE_ENABLE        1   0 turns `patch_model` into a no-op (the model keeps its own MoE blocks).
MEGAMOE_TIMEOUT_S     30  seconds the waits of the multi-rank path may take before TimeoutError:
                          the buffer's construction, all the collectives of one nccl-backend
                          call together (one deadline from the call's start), each device-side
                          barrier of a symm-backend call.
MEGAMOE_PDL           1   0 launches the kernels of a call without programmatic dependent launch
                          (kernels/launch.py `pdl_options`; for A/B timing in one run).
MEGAMOE_WGMMA         1   0 runs the prefill GEMMs on the Triton tiles instead of the Gluon wgmma
                          kernels of kernels/prefill_wgmma.py (for A/B timing in one run).
TRITON_INTERPRET      0   1 runs the Triton kernels on the CPU through Triton's interpreter (the
                          tests do this); must be set before megamoe is imported. Without it,
                          CPU tensors take the plain-torch path.
"""

from __future__ import annotations

import os


def _flag(name: str, default: str) -> bool:
    value = os.environ.get(name, default).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name}: expected 0 or 1, got {value!r}")


def enabled() -> bool:
    return _flag("MEGAMOE_ENABLE", "1")


def timeout_s() -> float:
    raw = os.environ.get("MEGAMOE_TIMEOUT_S", "30")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"MEGAMOE_TIMEOUT_S: expected a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"MEGAMOE_TIMEOUT_S: expected a positive number of seconds, got {raw!r}")
    return value


def pdl() -> bool:
    return _flag("MEGAMOE_PDL", "1")


def wgmma() -> bool:
    return _flag("MEGAMOE_WGMMA", "1")


def triton_interpret() -> bool:
    return _flag("TRITON_INTERPRET", "0")
