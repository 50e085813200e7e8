"""Counting the FLOPs this rank computes, for TFLOP/s and MFU in every log line.

The counter hooks the DiTs' matmul layers (every linear: local or Transformer Engine
tensor-parallel ones, plain ones, the patch embedding, LoRA adapters) and their attention cores,
and adds up each call from the shapes it sees: 2 * tokens * in * out per linear (with the local
weight shard and the tokens the rank really multiplies, which under sequence parallelism are the
gathered ones), 4 * B * Sq * Sk * heads * head_dim per attention (Ulysses: the gathered sequence
over this rank's heads). So tensor, sequence and Ulysses parallelism divide the count exactly as
they divide the work, and every DiT call of an iteration is in it (rollouts, fake updates, the
CFG teacher, the generator update).

A backward is counted when it runs (a hook on each layer's output): input gradients where the
input needs them (always, for megatron-core's own trainable linears, which compute them
unconditionally), weight gradients where the weight is trainable, twice the forward for
attention. Model FLOPs are the forward and the backward; hardware FLOPs add the forwards that
activation recompute runs again inside the backward (recognised by running inside autograd's
backward). Elementwise work (norms, RoPE, losses) is not counted, as Megatron's MFU does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from phased_dmd_mega.models.attention import AttentionCore
from phased_dmd_mega.models.lora import LoRALinear
from phased_dmd_mega.parallel.linears import local_linear_classes, parallel_linear_kind
from phased_dmd_mega.parallel.state import ulysses_size


@dataclass(frozen=True)
class Flops:
    model: float  # forward + backward
    hardware: float  # model + the forwards recompute repeats


# Dense tensor-core peaks, TFLOP/s, by GPU name fragment (the data sheets' SXM figures, without
# sparsity) and by the dtype the matmuls run in ("tf32": float32 with TF32 allowed).
PEAK_TFLOPS = {
    "H200": {"fp8": 1978.9, "bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9},
    "H100 PCIe": {"fp8": 1513.0, "bfloat16": 756.5, "float16": 756.5, "tf32": 378.0, "float32": 51.2},
    "H100": {"fp8": 1978.9, "bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9},
    "H800": {"fp8": 1978.9, "bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5},
    "B200": {"fp8": 4500.0, "bfloat16": 2250.0, "float16": 2250.0, "tf32": 1100.0, "float32": 75.0},
}


def peak_tflops(precision: str, device_name: Optional[str] = None) -> Optional[float]:
    """The dense peak of the GPU named ``device_name`` (default: this process's CUDA device)
    for ``precision`` (a PEAK_TFLOPS column); None on CPU or for a GPU not in the table."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for fragment, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if fragment in device_name:
            return peaks.get(precision)
    return None


def matmul_precision(dtype: str, tf32: bool, fp8: bool) -> str:
    """The PEAK_TFLOPS column of a run: its model dtype, TF32 and FP8 settings."""
    if fp8:
        return "fp8"
    if dtype == "float32":
        return "tf32" if tf32 else "float32"
    return dtype


def _inside_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _first_tensor(value) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class FlopCounter:
    """Attach to the models of a run, then ``take()`` what ran since the last take."""

    def __init__(self):
        self._attached = set()
        self._megatron_local = local_linear_classes()  # they compute input gradients unconditionally
        self._forward = self._backward = self._recompute = 0.0

    def attach(self, *models: nn.Module) -> "FlopCounter":
        for model in models:
            for module in model.modules():
                if id(module) in self._attached:
                    continue
                if isinstance(module, AttentionCore):
                    module.register_forward_hook(self._on_attention)
                elif isinstance(module, LoRALinear):
                    module.register_forward_hook(self._on_adapter)
                elif isinstance(module, (nn.Linear, nn.Conv3d)) or parallel_linear_kind(module) is not None:
                    module.register_forward_hook(self._on_linear)
                else:
                    continue
                self._attached.add(id(module))
        return self

    def take(self) -> Flops:
        counted = Flops(self._forward + self._backward, self._forward + self._backward + self._recompute)
        self._forward = self._backward = self._recompute = 0.0
        return counted

    # -- the hooks

    def _add(self, forward: float, backward: float, output: Optional[torch.Tensor]) -> None:
        if _inside_backward():  # activation recompute running a forward again
            self._recompute += forward
        else:
            self._forward += forward
        if backward and output is not None and output.requires_grad:
            output.register_hook(lambda grad: self._add_backward(backward))

    def _add_backward(self, flops: float) -> None:
        self._backward += flops

    def _on_linear(self, module: nn.Module, args, output) -> None:
        x, out, weight = _first_tensor(args), _first_tensor(output), module.weight
        if x is None or out is None:
            return
        in_features, out_features = math.prod(weight.shape[1:]), weight.shape[0]  # shapes only (FP8 weights too)
        tokens = max(x.numel() // in_features, out.numel() // out_features)  # the gathered ones under SP
        flops = 2.0 * tokens * in_features * out_features
        trainable = weight.requires_grad
        dgrad = x.requires_grad or (trainable and isinstance(module, self._megatron_local))
        self._add(flops, flops * (int(dgrad) + int(trainable)), out)

    def _on_adapter(self, module: nn.Module, args, output) -> None:
        name = module._state.active
        x, out = _first_tensor(args), _first_tensor(output)
        if name is None or name not in module.adapters or x is None or out is None:
            return
        pair = module.adapters[name]
        rank, a_in, b_out = pair.lora_A.shape[0], pair.lora_A.shape[1], pair.lora_B.shape[0]
        out_tokens = out.numel() // b_out
        a_tokens = max(x.numel() // a_in, out_tokens)  # a column adapter runs A on the gathered tokens
        a, b = 2.0 * a_tokens * a_in * rank, 2.0 * out_tokens * rank * b_out
        trainable = pair.lora_A.requires_grad
        backward = (a + 2 * b + (a if x.requires_grad else 0.0)) if trainable else 0.0
        self._add(a + b, backward, out)

    def _on_attention(self, module: nn.Module, args, output) -> None:
        q, k = args[0], args[1]
        sq, batch, heads, head_dim = q.shape
        gathered = ulysses_size() if module.ulysses else 1  # Sq, Sk x U over heads / U
        flops = 4.0 * batch * sq * k.shape[0] * heads * head_dim * gathered
        grads = any(t.requires_grad for t in args[:3])
        self._add(flops, 2 * flops if grads else 0.0, _first_tensor(output))
