"""Training checkpoints with megatron-core's ``dist_checkpointing``.

A checkpoint holds every trainable role's weights and AdamW states, sharded as they live
(tensor-parallel shards by megatron's tags, replicas written once), plus plain metadata
(iteration, phase, anything JSON-like). Because the tensors are stored by their global
layout, a checkpoint written at one tensor- or data-parallel size loads at another.

With the distributed optimizer each data-parallel rank holds a contiguous slice of every
parameter's flattened AdamW states. It writes that slice, under the same keys and global shapes
as whole states, as the few rectangular boxes the slice covers (``flat_range_boxes``): every
rank writes only what it holds, and any layout (another data- or tensor-parallel size, or the
per-rank optimizer) reads it back. bf16/fp16 weights add their fp32 main copy
(``<role>.optimizer.<name>.main_param``).

Publishing is atomic and durable: every rank writes into ``.iter_N.tmp``; the files reach the
disk (each node flushes what it wrote); rank 0 adds the run's files and the manifest
(checkpoint_folder.py), renames the folder to ``iter_N`` and only then rewrites ``latest``, each
step flushed. A crash, a kill or a power cut during a save leaves the previous checkpoint and
``latest`` untouched.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from phased_dmd_mega import parallel
from phased_dmd_mega.checkpoint_folder import (
    LATEST,
    checkpoint_name,
    checkpoint_to_resume,
    prune,
    write_latest,
    write_manifest,
)
from phased_dmd_mega.distill.optim import ADAM_STATES, MAIN_PARAM, DistributedRoleOptimizer
from phased_dmd_mega.files import fsync_tree, replace_folder
from phased_dmd_mega.log import get_logger

log = get_logger(__name__)

__all__ = ["LATEST", "checkpoint_name", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

CONFIG_FILE = "config.yaml"  # the resolved run configuration, inside every checkpoint the trainer writes
# A checkpoint's metadata key for an iteration stopped between sub-updates (absent: whole
# iterations): {"fake_updates_done": n, "logs": {...}, "seconds": s} (the trainer's StoppedIteration).
PARTIAL = "partial_iteration"


def generators_iteration(metadata: Mapping[str, Any]) -> int:
    """The last iteration whose generator update a checkpoint holds: its own, or the one before
    when it was saved inside an iteration (whose generator update had not run; -1: none yet)."""
    iteration = int(metadata["iteration"])
    return iteration - 1 if metadata.get(PARTIAL) is not None else iteration


def _sharded(tensor: torch.Tensor, key: str, like: nn.Parameter):
    from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

    if getattr(like, "tensor_model_parallel", False):
        return make_tp_sharded_tensor_for_checkpoint(tensor, key, tp_axis=like.partition_dim)
    return make_sharded_tensor_for_checkpoint(tensor, key)


Box = Tuple[Tuple[int, ...], Tuple[int, ...], int]  # offset, shape, flat index of its first element


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> List[Box]:
    """Elements [start, stop) of a row-major tensor of ``shape`` as rectangular boxes, in flat
    order. Each box is contiguous in flat order, so the matching piece of a flattened slice
    reshapes into it without a copy. At most two boxes per dimension."""
    shape = tuple(shape)
    if start >= stop:
        return []
    if not shape:
        return [((), (), 0)]
    inner = math.prod(shape[1:])
    first, head = divmod(start, inner)
    last, tail = divmod(stop, inner)

    def rows_of(row: int, lo: int, hi: int) -> List[Box]:
        return [((row, *off), (1, *box), row * inner + flat) for off, box, flat in flat_range_boxes(shape[1:], lo, hi)]

    if first == last:
        return rows_of(first, head, tail)
    boxes = []
    if head:
        boxes += rows_of(first, head, inner)
        first += 1
    if last > first:
        boxes.append(((first, *([0] * (len(shape) - 1))), (last - first, *shape[1:]), first * inner))
    if tail:
        boxes += rows_of(last, 0, tail)
    return boxes


def _sharded_boxes(flat: torch.Tensor, start: int, stop: int, key: str, like: nn.Parameter) -> Dict[str, Any]:
    """The slice [start, stop) of the flattened ``like``-shaped tensor, held as the 1-D ``flat``,
    as ShardedTensors of its boxes in the global (tensor-parallel-whole) tensor."""
    from megatron.core.dist_checkpointing import ShardedTensor

    tp_rank, tp_size = parallel.tensor_parallel_rank(), parallel.tensor_parallel_size()
    global_shape, tp_offset = list(like.shape), [0] * like.dim()
    split = getattr(like, "tensor_model_parallel", False)
    if split:
        global_shape[like.partition_dim] *= tp_size
        tp_offset[like.partition_dim] = tp_rank * like.shape[like.partition_dim]
    replica_id = (0, 0 if split else tp_rank, 0)  # data-parallel ranks hold disjoint slices
    pieces = {}
    for index, (offset, box, first) in enumerate(flat_range_boxes(like.shape, start, stop)):
        data = flat[first - start : first - start + math.prod(box)].view(box)
        pieces[f"{key}.box{index}"] = ShardedTensor(
            key,
            data,
            data.dtype,
            tuple(box),
            tuple(global_shape),
            tuple(o + t for o, t in zip(offset, tp_offset)),
            None,
            replica_id,
        )
    return pieces


def _distributed_optimizer_state(
    role_name: str, role: DistributedRoleOptimizer, saved_states: Sequence[str]
) -> Dict[str, Any]:
    state: Dict[str, Any] = {}
    params = dict(role.model.named_parameters())
    for name, owned in role.owned_slices().items():
        for state_name in saved_states:
            if state_name in owned.states:
                key = f"{role_name}.optimizer.{name}.{state_name}"
                state.update(_sharded_boxes(owned.states[state_name], owned.start, owned.stop, key, params[name]))
    return state


def _saved_states(role) -> List[str]:
    if isinstance(role, DistributedRoleOptimizer) and any(
        p.dtype != torch.float32 for p in role.model.parameters() if p.requires_grad
    ):
        return [*ADAM_STATES, MAIN_PARAM]
    return list(ADAM_STATES)


def sharded_state_dict(
    roles: Mapping[str, Any], metadata: Dict[str, Any], saved_states: Optional[Mapping[str, Sequence[str]]] = None
) -> Dict[str, Any]:
    """``roles`` maps a name to an object with ``.model`` and ``.optimizer`` (RoleOptimizer or
    DistributedRoleOptimizer); an optimizer of None saves weights alone (e.g. an EMA copy).
    ``saved_states``: the optimizer states to read per role (those a checkpoint holds)."""
    state: Dict[str, Any] = {"metadata": dict(metadata)}
    for role_name, role in roles.items():
        for name, param in role.model.named_parameters():
            key = f"{role_name}.model.{name}"
            state[key] = _sharded(param.data, key, param)
        if role.optimizer is None:
            continue
        names = list(saved_states[role_name]) if saved_states else _saved_states(role)
        if isinstance(role, DistributedRoleOptimizer):
            state.update(_distributed_optimizer_state(role_name, role, names))
            steps = role.steps()
        else:
            role.ensure_state()
            steps = {}
            for name, param in role.model.named_parameters():
                if param in role.optimizer.state:
                    for state_name in ADAM_STATES:
                        skey = f"{role_name}.optimizer.{name}.{state_name}"
                        state[skey] = _sharded(role.optimizer.state[param][state_name], skey, param)
                    steps[name] = float(role.optimizer.state[param]["step"])
        # common: the same on every rank
        state[f"{role_name}.optimizer_steps"] = steps
        state[f"{role_name}.optimizer_states"] = names
    return state


def save_checkpoint(
    root,
    iteration: int,
    roles: Mapping[str, Any],
    metadata: Dict[str, Any],
    keep_last: int = 3,
    files: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write, publish atomically, point ``latest`` at it, keep it and the ``keep_last - 1``
    checkpoints before it. ``files`` (name -> text, e.g. the run's ``config.yaml``) are written
    beside the tensors by rank 0, so that every checkpoint describes itself."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / checkpoint_name(iteration)
    staging = root / f".{final.name}.tmp"
    if parallel.global_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # a save that crashed before
        staging.mkdir()
    parallel.barrier()
    dist_checkpointing.save(sharded_state_dict(roles, {**metadata, "iteration": iteration}), str(staging))
    if parallel.global_rank() != 0 and os.environ.get("LOCAL_RANK", "0") == "0":
        fsync_tree(staging)  # what this node wrote (rank 0 flushes the whole folder as it publishes)
    parallel.barrier()
    if parallel.global_rank() == 0:
        # After the tensors: dist_checkpointing warns about (and clears) a folder that is not empty.
        for name, text in (files or {}).items():
            (staging / name).write_text(text)
        write_manifest(staging)
        replace_folder(staging, final)  # the same iteration may be saved again (e.g. after a resume)
        write_latest(root, final.name)
        prune(root, iteration, keep_last)
        log.info("saved checkpoint %s", final)
    parallel.barrier()
    return final


def latest_checkpoint(root) -> Optional[Path]:
    """The checkpoint to resume from in ``root`` (None when there is none yet): the one ``latest``
    names, or the newest intact one when that is damaged (checkpoint_folder.py)."""
    return checkpoint_to_resume(root)


def _states_in_checkpoint(common: Dict[str, Any], roles: Mapping[str, Any]) -> Dict[str, List[str]]:
    """The optimizer states each role can read: those saved (checkpoints before the distributed
    optimizer saved AdamW's two) that this role keeps."""
    found = {}
    for role_name, role in roles.items():
        if role.optimizer is not None:
            saved = common.get(f"{role_name}.optimizer_states", list(ADAM_STATES))
            found[role_name] = [name for name in _saved_states(role) if name in saved]
    return found


def _load_distributed_optimizer(
    role_name: str, role: DistributedRoleOptimizer, loaded: Dict[str, Any], states: Sequence[str]
) -> None:
    params, values = dict(role.model.named_parameters()), {}
    slices = role.owned_slices()
    for name, owned in slices.items():
        count = len(flat_range_boxes(params[name].shape, owned.start, owned.stop))
        for state_name in states:
            if state_name in owned.states:
                key = f"{role_name}.optimizer.{name}.{state_name}"
                # A copy: the load may have filled the template's views of the live states.
                values[name, state_name] = torch.cat([loaded[f"{key}.box{i}"].reshape(-1) for i in range(count)])
    role.reload_main_params()  # from the weights just loaded; a saved fp32 copy wins below
    for (name, state_name), value in values.items():
        slices[name].states[state_name].copy_(value)
    role.set_steps(loaded[f"{role_name}.optimizer_steps"])


def load_checkpoint(path, roles: Mapping[str, Any]) -> Dict[str, Any]:
    """Fill every role's weights and optimizer states from ``path``; return the metadata."""
    from megatron.core import dist_checkpointing

    states = _states_in_checkpoint(dist_checkpointing.load_common_state_dict(str(path)), roles)
    template = sharded_state_dict(roles, {}, states)
    loaded = dist_checkpointing.load(template, str(path))
    with torch.no_grad():
        for role_name, role in roles.items():
            optimizer = role.optimizer
            for name, param in role.model.named_parameters():
                param.copy_(loaded[f"{role_name}.model.{name}"])
            if optimizer is None:
                continue
            if isinstance(role, DistributedRoleOptimizer):
                _load_distributed_optimizer(role_name, role, loaded, states[role_name])
                continue
            steps = loaded[f"{role_name}.optimizer_steps"]
            role.set_steps(steps)
            for name, param in role.model.named_parameters():
                if name in steps:
                    for state_name in ADAM_STATES:
                        optimizer.state[param][state_name].copy_(loaded[f"{role_name}.optimizer.{name}.{state_name}"])
    return loaded["metadata"]
