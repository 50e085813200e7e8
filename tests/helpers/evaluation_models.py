"""Tiny random weights for `phased-dmd evaluate`'s model metrics, saved where a test says: a
transformers DINOv2 folder, AlexNet in torchvision's layout and LPIPS's linear layers in the lpips
package's v0.1 layout; and frames to measure (textures, shifted copies)."""

import numpy as np
import torch

from phased_dmd_mega.evaluation.lpips import CHANNELS, AlexNetFeatures


def save_tiny_dino(folder, seed=0):
    """A 2-layer DINOv2 (patch 4, width 32) and its image processor (32x32 crops)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=32
    )
    Dinov2Model(config).eval().save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


def alexnet_state(seed=0):
    """Random AlexNet features under torchvision's names, plus a classifier as torchvision has."""
    torch.manual_seed(seed)
    state = {f"features.{key}": value for key, value in AlexNetFeatures().features.state_dict().items()}
    state["classifier.1.weight"] = torch.randn(8, 9216)
    return state


def lin_state(seed=1):
    """LPIPS's linear layers as the lpips package's alex.pth stores them: non-negative [1, C, 1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) for k, c in enumerate(CHANNELS)}


def smooth_texture(height, width, seed=0, sigma=3.0):
    """A smooth random grey-level texture in 0..255 (float64): white noise blurred with a Gaussian."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((height, width))
    radius = int(3 * sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    blurred = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="same"), 1, noise)
    blurred = np.apply_along_axis(lambda col: np.convolve(col, kernel, mode="same"), 0, blurred)
    blurred = (blurred - blurred.min()) / (blurred.max() - blurred.min())
    return 20 + 215 * blurred


def shifted_video(frames, height, width, shift, seed=0):
    """uint8 [frames, height, width, 3]: one texture seen through a window moving right by ``shift``
    pixels per frame (so the content moves left by ``shift`` pixels per frame)."""
    texture = smooth_texture(height + 40, width + 40 + shift * frames, seed)
    video = [texture[20 : 20 + height, 20 + j * shift : 20 + j * shift + width] for j in range(frames)]
    grey = np.round(np.stack(video)).astype(np.uint8)
    return torch.from_numpy(np.repeat(grey[..., None], 3, axis=-1))
