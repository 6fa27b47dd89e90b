"""Launcher helpers: argument checks that name the argument, and the device guard."""

from __future__ import annotations

import contextlib
import functools

import torch

from .. import env


def check_tensor(name: str, t, *, dtypes=None, dim=None, shape=None, device=None, contiguous=False) -> None:
    """Raise TypeError / ValueError naming `name` unless `t` matches every given expectation."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")


def device_guard(t: torch.Tensor):
    """Launch on the tensor's CUDA device (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def use_triton(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU under TRITON_INTERPRET=1."""
    return device.type == "cuda" or env.triton_interpret()


@functools.cache
def _has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_options(device: torch.device) -> dict:
    """Launch arguments for programmatic dependent launch (PDL, sm_90 and later).

    With them a kernel may be launched while the kernel before it on the stream still runs; its
    programs start with `common.after_predecessor`, which waits for that kernel (and so, one
    by one, for every earlier one) before touching memory. What overlaps is the launch and the
    scheduling of the next kernel's programs with this kernel's tail. Off on the CPU, before
    sm_90 and with MEGAMOE_PDL=0; every kernel of a call takes the PDL constexpr.
    """
    if device.type == "cuda" and env.pdl() and not env.triton_interpret() and _has_pdl(device.index or 0):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
