"""Shared test set-up.

CUDA is hidden from every test run (CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET=1) but one whose
``-m`` expression selects only the tests marked ``gpu`` (``pytest -m gpu`` on a CUDA machine),
so that the CPU suite runs the same on a GPU host: gloo and CPU tensors, Triton kernels in
Triton's interpreter. Processes the tests start (run_distributed, torchrun) inherit both.

Both variables must be set before anything reads them: CUDA when torch first touches it,
Triton when a kernel module is imported (it decides at decoration time whether a kernel is
interpreted). So this module imports no torch, and they are set in ``pytest_configure``, which
runs before any test module is collected.
"""

import itertools
import os
import re

import pytest
from _pytest.mark.expression import Expression

GPU_MARK = "gpu"
HIDDEN_CUDA_SKIP = "needs CUDA: run `pytest -m gpu` on a CUDA machine"
_cuda_hidden = pytest.StashKey[bool]()


def selects_only_gpu_tests(markexpr: str) -> bool:
    """Whether ``-m markexpr`` selects tests marked ``gpu`` and no test without that mark, over
    every combination of the marks it names (``gpu``, ``gpu and not slow``: yes; no ``-m``,
    ``not gpu``, ``not slow``, ``gpu or slow``: no)."""
    if not markexpr:
        return False
    expression = Expression.compile(markexpr)
    # The names it mentions, read from the text (Expression.idents exists in recent pytest only).
    names = sorted(set(re.findall(r"[A-Za-z_]\w*", markexpr)) - {"and", "or", "not"} | {GPU_MARK})
    combinations = [set(marks) for count in range(len(names) + 1) for marks in itertools.combinations(names, count)]
    selected = [marks for marks in combinations if expression.evaluate(_marked_with(marks))]
    return bool(selected) and all(GPU_MARK in marks for marks in selected)


def _marked_with(marks):
    """pytest's matcher for a test that carries ``marks`` (whatever their arguments)."""
    return lambda name, /, **kwargs: name in marks


def pytest_configure(config):
    hide = not selects_only_gpu_tests(config.option.markexpr)
    if hide:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["TRITON_INTERPRET"] = "1"
    config.stash[_cuda_hidden] = hide


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason=HIDDEN_CUDA_SKIP if config.stash[_cuda_hidden] else "needs CUDA")
    for item in items:
        if GPU_MARK in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def float32_precision():
    """torch's float32 precision flags (TF32 on CUDA), put back after a test that sets them;
    yields a function that reads them: (matmul, cuDNN) as the legacy flags (which raise when
    they disagree with the new settings) and as the new matmul setting."""
    import torch

    backends = torch.backends
    saved = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32

    def read():
        return backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cuda.matmul.fp32_precision

    yield read
    backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = saved
