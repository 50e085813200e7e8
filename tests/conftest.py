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


@pytest.fixture
def float32_precision():
    """torch's float32 precision flags (TF32 on CUDA), put back after a test that sets them;
    yields a function that reads them: (matmul, cuDNN convolutions)."""
    backends = torch.backends
    saved = backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision

    def read():
        return backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision

    yield read
    backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision = saved
