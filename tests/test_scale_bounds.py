"""The grouped GEMMs never read past the end of a scale table.

The FP8 x MXFP4 loop loads each step's scales one step ahead; with K a multiple of 128 a
"next step" past the last one would read past the table. On the GPU that faulted where nothing
was mapped after the table (2 x H100, 2026-11-28, the symm buffer's last regions and the last
expert's weight scales). Here the weight-scale table of the last expert ends right at a page
that may not be read, and the kernels run under the Triton interpreter (which reads raw memory)
in a child process: an over-read kills the child with SIGSEGV instead of passing unnoticed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tolerances import LAYER_KERNEL_VS_REFERENCE

CHILD = textwrap.dedent('''
    import ctypes, dataclasses, mmap, os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import megamoe
    from megamoe.testing import MoEShape, make_problem, relative_error

    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

    def guarded_copy(t):
        """A copy of t whose last byte is followed by a page that cannot be read."""
        page = mmap.PAGESIZE
        body = -(-t.nbytes // page) * page
        region = mmap.mmap(-1, body + page)
        base = ctypes.addressof(ctypes.c_char.from_buffer(region))
        assert libc.mprotect(base + body, page, 0) == 0   # PROT_NONE
        raw = torch.frombuffer(region, dtype=torch.uint8, count=t.nbytes, offset=body - t.nbytes)
        out = raw.view(t.dtype).view(t.shape)
        out.copy_(t)
        guarded_copy.keep.append(region)
        return out
    guarded_copy.keep = []

    shape = MoEShape("bounds", 4, 2, 256, 128)   # H = 256 and I = 128: multiples of 128
    p = make_problem(shape, 5, seed=3)
    idx = torch.tensor([[3, 2], [3, 0], [1, 3], [3, -1], [2, 3]])   # the last expert in use
    l1, l2 = megamoe.transform_weights(p.l1, p.l2)
    l1 = dataclasses.replace(l1, w_sf=guarded_copy(l1.w_sf))
    l2 = dataclasses.replace(l2, w_sf=guarded_copy(l2.w_sf))
    buf = megamoe.MegaMoEBuffer(4, 5, 2, 256, 128, device="cpu")
    megamoe.pre_dispatch(p.x, idx, p.topk_weights, buf)
    y = torch.empty_like(p.x)
    megamoe.mega_moe(y, l1, l2, buf)
    ref = megamoe.reference.mega_moe_reference(p.x, idx, p.topk_weights, p.l1, p.l2)
    print("relative error", relative_error(y, ref))
''')


@pytest.mark.skipif(sys.platform != "linux", reason="uses mprotect on an anonymous mapping")
def test_weight_scales_are_not_read_past_their_end():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    err = float(proc.stdout.split("relative error")[-1])
    assert err <= LAYER_KERNEL_VS_REFERENCE
