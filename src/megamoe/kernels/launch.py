"""Launcher helpers: argument checks that name the argument, and the device guard."""

from __future__ import annotations

import contextlib

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
