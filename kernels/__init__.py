"""Fused Triton kernels of phased-dmd-mega, imported as ``phased_dmd_mega.kernels``.

This folder is mapped into the package by ``setup.py`` (``package_dir``) so that it never
collides with the unrelated PyPI package named ``kernels``. Kernels run on CUDA tensors, and
on CPU tensors only under ``TRITON_INTERPRET=1``.
"""
