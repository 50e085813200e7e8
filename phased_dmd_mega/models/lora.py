"""LoRA adapters on tensor-parallel linears, several roles sharing one frozen base model.

``inject_lora`` wraps the chosen column-/row-parallel linears of a model (the frozen teacher) in
place. ``add_adapter`` then gives each role its own low-rank pair per wrapped layer and returns
an ``AdapterView``: a module that runs the shared model with its adapter switched on, and whose
parameters are its adapters alone. The base model called directly runs without any adapter.

The update is y += (alpha / r) * B A x, split to match its layer under tensor parallelism:
- column-parallel W [out/tp, in]: A [r, in] whole on every rank, B [out/tp, r] split like W.
  Each rank's gradient of A covers only its rows of B: a partial sum over the TP group, tagged
  ``sequence_parallel`` (the tag the trainer sums over TP).
- row-parallel W [out, in/tp]: A [r, in/tp] split like W, B [out, r] whole; A x is summed over
  the TP group (reduce-scattered to the rank's tokens under sequence parallelism, where B's
  gradient is then a partial sum, tagged likewise).
B starts at zero, so every role starts equal to the base model.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from phased_dmd_mega.parallel.linears import parallel_linear_kind
from phased_dmd_mega.parallel.state import tensor_parallel_rank, tensor_parallel_size


class _AdapterState:
    """Which adapter the wrapped layers of one model apply right now (None: the base model)."""

    def __init__(self):
        self.active: Optional[str] = None

    @contextlib.contextmanager
    def activate(self, name: Optional[str]):
        previous, self.active = self.active, name
        try:
            yield
        finally:
            self.active = previous


class LoRAPair(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.lora_A, self.lora_B, self.scale = nn.Parameter(a), nn.Parameter(b), scale


class LoRALinear(nn.Module):
    """A column- or row-parallel linear (frozen) plus per-adapter low-rank updates."""

    def __init__(self, base: nn.Module, kind: str, state: _AdapterState, path: str):
        super().__init__()
        self.base, self.kind, self.path = base, kind, path
        self.adapters = nn.ModuleDict()
        object.__setattr__(self, "_state", state)  # shared, not a submodule

    @property
    def sequence_parallel(self) -> bool:
        return bool(getattr(self.base, "sequence_parallel", False))

    def add(self, name: str, rank: int, alpha: float) -> LoRAPair:
        weight = self.base.weight
        out_local, in_local = weight.shape
        tp, rank_in_tp = tensor_parallel_size(), tensor_parallel_rank()
        full_in = in_local * tp if self.kind == "row" else in_local
        # The same A on every rank and at every TP size: drawn whole from a seed of the names.
        gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{self.path}".encode()))
        a = torch.randn(rank, full_in, generator=gen, dtype=torch.float32) / math.sqrt(full_in)
        if self.kind == "row":
            a = a[:, rank_in_tp * in_local : (rank_in_tp + 1) * in_local]
        b = torch.zeros(out_local if self.kind == "column" else weight.shape[0], rank)
        pair = LoRAPair(
            a.to(weight.dtype).to(weight.device), b.to(weight.dtype).to(weight.device), (alpha or rank) / rank
        )
        self._tag(pair, tp)
        self.adapters[name] = pair
        return pair

    def _tag(self, pair: LoRAPair, tp: int) -> None:
        split, whole = (pair.lora_B, pair.lora_A) if self.kind == "column" else (pair.lora_A, pair.lora_B)
        split.tensor_model_parallel, split.partition_dim, split.partition_stride = (
            True,
            (0 if self.kind == "column" else 1),
            1,
        )
        if tp > 1 and (self.kind == "column" or self.sequence_parallel):
            whole.sequence_parallel = True  # a partial sum over the TP group

    def forward(self, x: torch.Tensor):
        out, bias = self.base(x)
        name = self._state.active
        if name is None or name not in self.adapters:
            return out, bias
        pair = self.adapters[name]
        return out + pair.scale * self._update(x, pair), bias

    def _update(self, x: torch.Tensor, pair: LoRAPair) -> torch.Tensor:
        from megatron.core import tensor_parallel as mtp

        tp = tensor_parallel_size()
        if self.kind == "column":
            if tp > 1:
                x = (
                    mtp.gather_from_sequence_parallel_region(x)
                    if self.sequence_parallel
                    else mtp.copy_to_tensor_model_parallel_region(x)
                )
            return (x @ pair.lora_A.t()) @ pair.lora_B.t()
        low = x @ pair.lora_A.t()
        if tp > 1:
            low = (
                mtp.reduce_scatter_to_sequence_parallel_region(low)
                if self.sequence_parallel
                else mtp.reduce_from_tensor_model_parallel_region(low)
            )
        return low @ pair.lora_B.t()


def inject_lora(model: nn.Module, target_modules: Iterable[str]) -> List[LoRALinear]:
    """Wrap every parallel linear whose name ends with one of ``target_modules`` (once)."""
    existing = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if existing:
        return existing
    state = _AdapterState()
    object.__setattr__(model, "_lora_state", state)
    targets = tuple(target_modules)
    wrapped = []
    for path, module in list(model.named_modules()):
        kind = parallel_linear_kind(module)  # local megatron or Transformer Engine
        if kind is None or path.split(".")[-1] not in targets:
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapper = LoRALinear(module, kind, state, path)
        setattr(parent, attr, wrapper)
        wrapped.append(wrapper)
    if not wrapped:
        raise ValueError(f"no parallel linear named {', '.join(targets)} to adapt")
    model.requires_grad_(False)
    return wrapped


class AdapterView(nn.Module):
    """One role: the shared model with adapter ``name`` switched on. Its parameters are its own
    adapters only; the base weights belong to the shared model."""

    def __init__(self, model: nn.Module, name: str, pairs: List[LoRAPair]):
        super().__init__()
        object.__setattr__(self, "shared", model)  # not a submodule: no second copy in state dicts
        self.name = name
        self.adapters = nn.ModuleList(pairs)
        self.dims, self.par = getattr(model, "dims", None), getattr(model, "par", None)

    def forward(self, *args, **kwargs):
        with self.shared._lora_state.activate(self.name):
            return self.shared(*args, **kwargs)


def add_adapter(model: nn.Module, name: str, rank: int, alpha: float, target_modules: Iterable[str]) -> AdapterView:
    """A new LoRA role on ``model`` (wrapping its target layers the first time)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    wrappers = inject_lora(model, target_modules)
    if any(name in w.adapters for w in wrappers):
        raise ValueError(f"adapter {name!r} already exists")
    return AdapterView(model, name, [w.add(name, rank, alpha) for w in wrappers])


# ----------------------------------------------------------------------------- reading a role out


def adapter_layers(view: AdapterView) -> List[Tuple[str, LoRAPair]]:
    """(path of the adapted linear in the shared model, this role's pair) for every adapted
    layer, in the model's order."""
    return [
        (m.path, m.adapters[view.name])
        for m in view.shared.modules()
        if isinstance(m, LoRALinear) and view.name in m.adapters
    ]


@torch.no_grad()
def merged_parameters(view: AdapterView) -> Dict[str, torch.Tensor]:
    """The role as a plain model: the shared model's parameters under the names they have
    without adapters, each adapted weight replaced by W + (alpha / r) B A (computed in float64,
    which no TF32 setting touches, stored in W's dtype). Under tensor parallelism every rank
    merges its own slices: B (column) or A (row) is split exactly like W."""
    pairs = dict(adapter_layers(view))
    wrapped = {m.path for m in view.shared.modules() if isinstance(m, LoRALinear)}
    merged: Dict[str, torch.Tensor] = {}
    for name, param in view.shared.named_parameters():
        owner, is_adapter, _ = name.partition(".adapters.")
        if is_adapter and owner in wrapped:
            continue  # some role's adapter
        module, _, leaf = name.rpartition(".")
        path = module[: -len(".base")] if module.endswith(".base") else None
        if path not in wrapped:
            merged[name] = param.detach()
            continue
        weight = param.detach()
        if leaf == "weight" and path in pairs:
            pair = pairs[path]
            update = pair.scale * (pair.lora_B.double() @ pair.lora_A.double())
            weight = (weight.double() + update).to(weight.dtype)
        merged[f"{path}.{leaf}"] = weight
    return merged
