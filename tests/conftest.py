"""Shared test set-up.

Triton decides at decoration time whether a kernel is interpreted, so TRITON_INTERPRET must be
set before any kernel module is imported: on machines without CUDA every kernel test runs in
Triton's interpreter on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
