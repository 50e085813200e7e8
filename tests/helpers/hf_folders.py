"""Hugging Face folders for the conversion tests: tiny random diffusers Wan models (every
parameter random, norms included: ``randomize_``) saved with save_pretrained (sharded), read
back, compared bitwise, rewritten as one file, and the check that a refused conversion leaves
nothing at its destination."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from phased_dmd_mega.models.architecture_types import CheckpointError

from helpers.damaged_files import assert_nothing_left
from helpers.tiny_models import WAN_TINY, randomize_

TINY = WAN_TINY
VARIANTS = {
    "t2v": {},
    "i2v": dict(image_dim=8, added_kv_proj_dim=48),  # Wan2.1 I2V image branch
    "ti2v": dict(in_channels=48, out_channels=48),  # Wan2.2 TI2V-5B channels
}
SMALL_SHARDS = "40KB"  # several files for the tiny model


def diffusers_model(seed=0, dtype=torch.float32, **overrides):
    from diffusers import WanTransformer3DModel

    model = randomize_(WanTransformer3DModel(**{**TINY, **overrides}).eval(), seed)
    if dtype != torch.float32:  # like real checkpoints: bf16 with the modulation tables in fp32
        model.to(dtype)
        for name, param in model.named_parameters():
            if name.endswith("scale_shift_table"):
                param.data = param.data.float()
    return model


def save_diffusers(folder, seed=0, dtype=torch.float32, shards=SMALL_SHARDS, **overrides):
    diffusers_model(seed, dtype, **overrides).save_pretrained(folder, max_shard_size=shards)
    return Path(folder)


def read_folder(folder):
    """Every tensor of a safetensors folder."""
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                assert key not in tensors, key
                tensors[key] = handle.get_tensor(key)
    return tensors


def assert_bitwise_equal(got, want):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


def assert_refused(action, message, dst, error=CheckpointError):
    with pytest.raises(error, match=message):
        action()
    assert_nothing_left(dst)


def rewrite_single_file(folder, edit):
    """Re-save a diffusers folder as one file after ``edit(state)``."""
    state = read_folder(folder)
    for file in list(folder.glob("*.safetensors")) + list(folder.glob("*.index.json")):
        file.unlink()
    edit(state)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
