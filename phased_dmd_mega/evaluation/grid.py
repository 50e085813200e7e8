"""A picture of the samples: prompts x seeds, one labelled block per set, as a uint8 array
[H, W, 3] (``grid_image``; for TensorBoard, ``add_image(tag, grid, dataformats="HWC")``); writing
it is the caller's business.

A tile is the middle frame (frame F // 2) of a sample, or with ``strip`` = K > 1 that many frames
evenly spaced from the first to the last, side by side; resized to ``tile_height`` pixels high
(the width keeps the aspect). A set without decoded frames shows its latents instead: channels
0-2 of the same latent frames, each tile min-max scaled on its own.

Layout of one block, top to bottom: a title band (TITLE pixels: the set's name), then one row per
prompt (ascending) of TILE + PAD pixels, then PAD; left of the rows a LABEL-pixel margin naming the
prompt; the columns are the prompt's seeds in sample order, each tile labelled with its seed.
A block is LABEL + columns x (tile width + PAD) + PAD wide; the grid is the blocks stacked, as wide
as the widest (``grid_size`` gives the size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from phased_dmd_mega.evaluation.statistics import group_by_prompt, prompt_list, uint8_frames

TITLE, LABEL, PAD = 20, 72, 4
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def _strip_indices(count: int, strip: int) -> List[int]:
    if strip <= 1 or count == 1:
        return [count // 2]
    return sorted({round(j * (count - 1) / (strip - 1)) for j in range(strip)})


def frame_tiles(frames: torch.Tensor, strip: int = 1) -> np.ndarray:
    """frames [N, F, H, W, 3] (uint8, or floats in [0, 1]) -> uint8 [N, H, W * K, 3]."""
    picked = uint8_frames(frames[:, _strip_indices(frames.shape[1], strip)])
    return np.concatenate(list(picked.permute(1, 0, 2, 3, 4).numpy()), axis=2)


def latent_tiles(latents: torch.Tensor, strip: int = 1) -> np.ndarray:
    """latents [N, C, F, H, W] -> uint8 [N, H, W * K, 3]: channels 0-2 (repeated when C < 3),
    each sample's tile min-max scaled."""
    picked = latents[:, :, _strip_indices(latents.shape[2], strip)].float()
    channels = picked[:, [min(c, picked.shape[1] - 1) for c in range(3)]]  # [N, 3, K, H, W]
    low = channels.amin(dim=(1, 2, 3, 4), keepdim=True)
    high = channels.amax(dim=(1, 2, 3, 4), keepdim=True)
    scaled = (channels - low) / (high - low).clamp_min(1e-12)
    tiles = (scaled * 255).round().to(torch.uint8).permute(0, 3, 2, 4, 1)  # [N, H, K, W, 3]
    return tiles.reshape(tiles.shape[0], tiles.shape[1], -1, 3).numpy()


@dataclass
class GridBlock:
    """One set in the grid: its title, one tile per sample (uint8 [N, h, w, 3]), and each
    sample's prompt and seed."""

    title: str
    tiles: np.ndarray
    prompt_index: Sequence[int]
    seeds: Sequence[int]
    label: str = "seed"  # what the numbers on the tiles are (the demo's: "sample", "mode")

    @classmethod
    def of(
        cls, title, prompt_index, seeds, frames=None, latents=None, strip: int = 1, label: str = "seed"
    ) -> "GridBlock":
        """From frames when given, else from latents (the title then says so)."""
        if frames is not None:
            return cls(title, frame_tiles(frames, strip), prompt_list(prompt_index), list(seeds), label)
        tiles = latent_tiles(latents, strip)
        return cls(f"{title} (latents, channels 0-2)", tiles, prompt_list(prompt_index), list(seeds), label)

    def columns(self) -> int:
        return max(len(members) for members in group_by_prompt(self.prompt_index).values())

    def rows(self) -> int:
        return len(group_by_prompt(self.prompt_index))


def tile_width(tiles: np.ndarray, tile_height: int) -> int:
    return max(1, round(tiles.shape[2] * tile_height / tiles.shape[1]))


def block_size(block: GridBlock, tile_height: int) -> Tuple[int, int]:
    """(height, width) of one block."""
    width = tile_width(block.tiles, tile_height)
    return TITLE + block.rows() * (tile_height + PAD) + PAD, LABEL + block.columns() * (width + PAD) + PAD


def grid_size(blocks: Sequence[GridBlock], tile_height: int = 128) -> Tuple[int, int]:
    """(height, width) of ``grid_image(blocks, tile_height)``."""
    sizes = [block_size(block, tile_height) for block in blocks]
    return sum(h for h, _ in sizes), max(w for _, w in sizes)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType's sized default font
        return ImageFont.load_default()


def grid_image(blocks: Sequence[GridBlock], tile_height: int = 128, title_font: Optional[int] = 14) -> np.ndarray:
    """The grid of ``blocks`` as uint8 [H, W, 3]."""
    from PIL import Image, ImageDraw

    height, width = grid_size(blocks, tile_height)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    big, small = _font(title_font), _font(11)
    top = 0
    for block in blocks:
        tile_w = tile_width(block.tiles, tile_height)
        draw.text((PAD, top + 3), block.title, fill=INK, font=big)
        for row, (prompt, members) in enumerate(group_by_prompt(block.prompt_index).items()):
            y = top + TITLE + row * (tile_height + PAD)
            draw.text((PAD, y + tile_height // 2 - 6), f"prompt {prompt}", fill=INK, font=small)
            for column, sample in enumerate(members):
                x = LABEL + column * (tile_w + PAD)
                tile = Image.fromarray(block.tiles[sample]).resize((tile_w, tile_height), Image.BILINEAR)
                canvas.paste(tile, (x, y))
                label = f"{block.label} {block.seeds[sample]}"
                box = draw.textbbox((x + 2, y + 1), label, font=small)
                draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=INK)
                draw.text((x + 2, y + 1), label, fill=BACKGROUND, font=small)
        top += block_size(block, tile_height)[0]
    return np.asarray(canvas)
