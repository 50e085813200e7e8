"""Fused Triton kernels of phased-dmd-mega, imported as ``phased_dmd_mega.kernels``.

This folder is mapped into the package by ``setup.py`` (``package_dir``) so that it never
collides with the unrelated PyPI package named ``kernels``. Kernels run on CUDA tensors, and
on CPU tensors only under ``TRITON_INTERPRET=1``.
"""

from phased_dmd_mega.kernels.dmd import DMDLossFunction, dmd_loss_triton
from phased_dmd_mega.kernels.subinterval_loss import (
    SubintervalFlowLossFunction,
    is_interpreted,
    scale_rows,
    subinterval_flow_loss_triton,
)

__all__ = [
    "DMDLossFunction",
    "SubintervalFlowLossFunction",
    "dmd_loss_triton",
    "is_interpreted",
    "scale_rows",
    "subinterval_flow_loss_triton",
]
