"""Training checkpoints with megatron-core's ``dist_checkpointing``.

A checkpoint holds every trainable role's weights and AdamW states, sharded as they live
(tensor-parallel shards by megatron's tags, replicas written once), plus plain metadata
(iteration, phase, anything JSON-like). Because the tensors are stored by their global
layout, a checkpoint written at one tensor- or data-parallel size loads at another.

Publishing is atomic: every rank writes into ``.iter_N.tmp``; rank 0 renames it to
``iter_N`` and only then rewrites ``latest`` (through a temporary file and ``os.replace``).
A crash during a save leaves the previous checkpoint and ``latest`` untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from phased_dmd_mega.log import get_logger

log = get_logger(__name__)

LATEST = "latest"
CONFIG_FILE = "config.yaml"  # the resolved run configuration, inside every checkpoint the trainer writes
ADAM_STATES = ("exp_avg", "exp_avg_sq")


def _sharded(tensor: torch.Tensor, key: str, like: nn.Parameter):
    from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

    if getattr(like, "tensor_model_parallel", False):
        return make_tp_sharded_tensor_for_checkpoint(tensor, key, tp_axis=like.partition_dim)
    return make_sharded_tensor_for_checkpoint(tensor, key)


def _ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW creates its state at the first step; loading needs it to exist already."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                for name in ADAM_STATES:
                    state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)


def sharded_state_dict(roles: Mapping[str, Any], metadata: Dict[str, Any]) -> Dict[str, Any]:
    """``roles`` maps a name to an object with ``.model`` and ``.optimizer`` (RoleOptimizer);
    an optimizer of None saves weights alone (e.g. an EMA copy)."""
    state: Dict[str, Any] = {"metadata": dict(metadata)}
    for role_name, role in roles.items():
        optimizer = role.optimizer
        if optimizer is not None:
            _ensure_adam_state(optimizer)
        steps = {}
        for name, param in role.model.named_parameters():
            key = f"{role_name}.model.{name}"
            state[key] = _sharded(param.data, key, param)
            if optimizer is not None and param in optimizer.state:
                for state_name in ADAM_STATES:
                    skey = f"{role_name}.optimizer.{name}.{state_name}"
                    state[skey] = _sharded(optimizer.state[param][state_name], skey, param)
                steps[name] = float(optimizer.state[param]["step"])
        state[f"{role_name}.optimizer_steps"] = steps  # common: the same on every rank
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def save_checkpoint(root, iteration: int, roles: Mapping[str, Any], metadata: Dict[str, Any], keep_last: int = 3,
                    files: Optional[Mapping[str, str]] = None) -> Path:
    """Write, publish atomically, point ``latest`` at it, keep the last ``keep_last``.
    ``files`` (name -> text, e.g. the run's ``config.yaml``) are written beside the tensors by
    rank 0, so that every checkpoint describes itself."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / checkpoint_name(iteration)
    staging = root / f".{final.name}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # a save that crashed before
        staging.mkdir()
        for name, text in (files or {}).items():
            (staging / name).write_text(text)
    _barrier()
    dist_checkpointing.save(sharded_state_dict(roles, {**metadata, "iteration": iteration}), str(staging))
    _barrier()
    if _rank() == 0:
        if final.exists():  # the same iteration saved again (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(staging, final)
        _write_latest(root, final.name)
        _prune(root, keep_last)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(json.dumps({"checkpoint": name}))
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep_last: int) -> None:
    published = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in published[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root) -> Optional[Path]:
    """The checkpoint ``latest`` points at, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / json.loads(pointer.read_text())["checkpoint"]
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} points at {path.name}, which does not exist")
    return path


def load_checkpoint(path, roles: Mapping[str, Any]) -> Dict[str, Any]:
    """Fill every role's weights and optimizer states from ``path``; return the metadata."""
    from megatron.core import dist_checkpointing

    template = sharded_state_dict(roles, {})
    loaded = dist_checkpointing.load(template, str(path))
    with torch.no_grad():
        for role_name, role in roles.items():
            optimizer = role.optimizer
            steps = loaded[f"{role_name}.optimizer_steps"]
            for name, param in role.model.named_parameters():
                param.copy_(loaded[f"{role_name}.model.{name}"])
                if optimizer is not None and name in steps:
                    state = optimizer.state[param]
                    for state_name in ADAM_STATES:
                        state[state_name].copy_(loaded[f"{role_name}.optimizer.{name}.{state_name}"])
                    state["step"] = torch.tensor(steps[name], dtype=torch.float32)
    return loaded["metadata"]
