"""Test setup: without a GPU, run the Triton kernels through Triton's interpreter.

TRITON_INTERPRET must be set before triton (and so megamoe) is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--stress-iterations", type=int, default=0,
                     help="also run the heavy pressure and fault tests of tests/test_stress.py, with this many "
                          "iterations per path and rank count (default 0: only the small CI set)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
