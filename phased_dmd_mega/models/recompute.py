"""Running a DiT's blocks in order, with megatron's activation recompute for the chosen ones."""

from __future__ import annotations

import torch

from phased_dmd_mega.parallel.state import tensor_parallel_group

RECOMPUTE_MODES = ("none", "full", "blocks")


def _checkpoint(block, fp8: bool, *args):
    """megatron's checkpoint (RNG states included); under FP8 TE's, which re-runs the block in
    the FP8 autocast state of its forward (megatron's TransformerBlock does the same). Both save
    their arguments for the backward, which takes tensors only: other arguments (a KeyMask) are
    bound into the function instead."""
    bound = {i: arg for i, arg in enumerate(args) if not (arg is None or torch.is_tensor(arg))}

    def run(*tensors):
        given = iter(tensors)
        return block(*(bound[i] if i in bound else next(given) for i in range(len(args))))

    tensors = [arg for i, arg in enumerate(args) if i not in bound]
    if fp8:
        from megatron.core.extensions.transformer_engine import te_checkpoint
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        return te_checkpoint(run, False, get_cuda_rng_tracker, tensor_parallel_group(), *tensors)
    from megatron.core.tensor_parallel import checkpoint

    return checkpoint(run, False, *tensors)


def run_blocks(block_modules, x, *args, recompute: str = "none", recompute_num_blocks: int = 0, fp8: bool = False):
    """Run the blocks in order; with activation recompute, the chosen blocks keep only their
    inputs and are re-run in the backward.

    ``x`` is one token tensor, or a tuple of them for multi-stream blocks (each block then
    takes the streams as its first arguments and returns them as a tuple): the streams are
    passed to the checkpoint as separate tensors so that each gets its gradient."""
    streams = isinstance(x, tuple)
    for index, block in enumerate(block_modules):
        inputs = x if streams else (x,)
        recomputed = recompute == "full" or (recompute == "blocks" and index < recompute_num_blocks)
        if recomputed and torch.is_grad_enabled():
            x = _checkpoint(block, fp8, *inputs, *args)
        else:
            x = block(*inputs, *args)
    return x
