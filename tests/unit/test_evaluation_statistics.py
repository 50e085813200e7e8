"""The model-free statistics of `phased-dmd evaluate` (evaluation/statistics.py) against float64
formulas written here, and the identities they must satisfy."""

import itertools
import math

import numpy as np
import pytest
import torch

from phased_dmd_mega.evaluation import statistics
from phased_dmd_mega.evaluation.grid import PAD, TITLE, GridBlock, grid_image, grid_size

PROMPTS = [0, 1, 0, 1, 0, 2]  # prompt 2 has a single seed


def reference_spread(samples, prompts):
    """Mean over each prompt's pairs of sqrt(mean((a - b)^2)), numpy float64."""
    out = {}
    for p in sorted(set(prompts)):
        members = [samples[i].astype(np.float64) for i, q in enumerate(prompts) if q == p]
        pairs = list(itertools.combinations(members, 2))
        if pairs:
            out[p] = float(np.mean([math.sqrt(np.mean((a - b) ** 2)) for a, b in pairs]))
    return out


def test_latent_spread_of_identical_latents_is_zero():
    latents = torch.randn(1, 4, 2, 3, 5).expand(6, -1, -1, -1, -1).contiguous()
    assert statistics.latent_spread(latents, PROMPTS) == {0: 0.0, 1: 0.0}


def test_latent_spread_matches_a_float64_formula():
    latents = torch.randn(6, 4, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    got = statistics.latent_spread(latents, PROMPTS)
    want = reference_spread(latents.numpy(), PROMPTS)
    assert set(got) == {0, 1} == set(want)  # the single-seed prompt has no pair
    for p in want:
        assert got[p] == pytest.approx(want[p], rel=1e-12)
    assert statistics.mean_over_prompts(got) == pytest.approx((want[0] + want[1]) / 2, rel=1e-12)


def test_pixel_spread_is_the_same_on_uint8_and_on_its_floats():
    frames = torch.randint(0, 256, (6, 3, 8, 9, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    want = reference_spread(frames.numpy() / 255.0, PROMPTS)
    for given in (frames, frames.float() / 255):
        got = statistics.pixel_spread(given, PROMPTS)
        assert got.keys() == want.keys() and all(got[p] == pytest.approx(want[p], rel=1e-6) for p in want)


def test_saturation_of_all_clipped_and_of_mid_grey():
    clipped = torch.randint(0, 2, (2, 1, 6, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)) * 255
    grey = torch.full((2, 1, 6, 7, 3), 128, dtype=torch.uint8)
    assert statistics.clipped_fraction(clipped, [0, 1]) == {0: 1.0, 1: 1.0}
    assert statistics.clipped_fraction(grey, [0, 1]) == {0: 0.0, 1: 0.0}
    assert statistics.clipped_fraction(torch.full((1, 1, 4, 4, 3), 0.5), [0]) == {0: 0.0}
    assert statistics.hsv_saturation(grey, [0, 0]) == {0: 0.0}
    # One pixel value in eight clipped: 1/8; pure red has HSV saturation 1, (255, 128, 128) 127/255.
    half = torch.full((1, 1, 2, 4, 3), 128, dtype=torch.uint8)
    half[0, 0, 0, 0, 0] = 255
    half[0, 0, 1, 1, 2] = 0
    assert statistics.clipped_fraction(half, [0])[0] == pytest.approx(2 / 24)
    red = torch.tensor([[[[[255, 0, 0], [255, 128, 128]]]]], dtype=torch.uint8)
    assert statistics.hsv_saturation(red, [0])[0] == pytest.approx((1 + 127 / 255) / 2)


def test_frame_change_of_a_static_video_is_zero_and_of_a_step_its_mean_difference():
    static = torch.full((2, 4, 5, 6, 3), 77, dtype=torch.uint8)
    assert statistics.frame_change(static, [0, 0]) == {0: 0.0}
    step = torch.zeros(1, 3, 5, 6, 3)
    step[0, 1:] = 0.25  # one change of 0.25 over two frame pairs
    assert statistics.frame_change(step, [0])[0] == pytest.approx(0.125)
    assert statistics.frame_change(torch.zeros(2, 1, 4, 4, 3), [0, 1]) == {}  # images: undefined


def test_pairwise_cosine_identities():
    same = torch.randn(1, 16).expand(4, -1)
    assert statistics.pairwise_cosine(same, [0, 0, 1, 1]) == pytest.approx({0: 1.0, 1: 1.0}, abs=1e-12)
    opposite = torch.stack([torch.ones(8), -torch.ones(8)])
    assert statistics.pairwise_cosine(opposite, [3, 3]) == pytest.approx({3: -1.0})


def test_model_free_statistics_names_what_the_inputs_allow():
    latents = torch.randn(4, 2, 1, 3, 3)
    assert set(statistics.model_free_statistics(latents, None, [0, 0, 1, 1])) == {"latent_spread", "latent_rms"}
    latent_videos = torch.randn(4, 2, 3, 3, 3)
    assert "latent_frame_change" in statistics.model_free_statistics(latent_videos, None, [0, 0, 1, 1])
    images = torch.rand(4, 1, 5, 5, 3)
    assert "frame_change" not in statistics.model_free_statistics(latents, images, [0, 0, 1, 1])
    videos = torch.rand(4, 3, 5, 5, 3)
    assert "frame_change" in statistics.model_free_statistics(latents, videos, [0, 0, 1, 1])


def test_select_frames_middle_and_all():
    frames = torch.arange(5).view(1, 5, 1, 1, 1).expand(2, 5, 2, 2, 3)
    assert statistics.select_frames(frames, "middle")[:, :, 0, 0, 0].tolist() == [[2], [2]]
    assert statistics.select_frames(frames, "all").shape[1] == 5
    with pytest.raises(ValueError, match="frame selection"):
        statistics.select_frames(frames, "first")


def test_grid_is_prompts_by_seeds_per_set_and_shows_the_middle_frame():
    frames = torch.zeros(4, 3, 10, 20, 3, dtype=torch.uint8)
    frames[:, 1] = 200  # the middle frame
    blocks = [
        GridBlock.of("a", [0, 0, 1, 1], [0, 1, 2, 3], frames=frames),
        GridBlock.of("b", [5, 5, 5], [7, 8, 9], latents=torch.randn(3, 4, 2, 4, 4)),
    ]
    grid = grid_image(blocks, tile_height=30)
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    assert grid.shape[:2] == grid_size(blocks, 30)
    # Set a: 2 prompts x 2 seeds of 60x30 tiles; set b: 1 prompt x 3 seeds of 30x30.
    assert grid_size(blocks[:1], 30) == (TITLE + 2 * (30 + PAD) + PAD, 72 + 2 * (60 + PAD) + PAD)
    assert grid_size(blocks[1:], 30) == (TITLE + 1 * (30 + PAD) + PAD, 72 + 3 * (30 + PAD) + PAD)
    assert "latents" in blocks[1].title
    tile = grid[TITLE + 20 : TITLE + 30, 72 + 30 : 72 + 60]  # below the seed label
    assert (tile == 200).all()


def test_latent_rms_and_latent_frame_change_against_float64_formulas():
    latents = torch.randn(4, 2, 3, 3, 5, dtype=torch.float64)
    prompts = [0, 0, 1, 1]
    rms = [latents[i].square().mean().sqrt().item() for i in range(4)]
    assert statistics.latent_rms(latents.float(), prompts) == pytest.approx(
        {0: (rms[0] + rms[1]) / 2, 1: (rms[2] + rms[3]) / 2}, rel=1e-6
    )
    change = [(latents[i][:, 1:] - latents[i][:, :-1]).abs().mean().item() for i in range(4)]
    got = statistics.latent_frame_change(latents.float(), prompts)
    assert got == pytest.approx({0: (change[0] + change[1]) / 2, 1: (change[2] + change[3]) / 2}, rel=1e-6)
    static = latents[:, :, :1].expand(-1, -1, 3, -1, -1)
    assert statistics.latent_frame_change(static, prompts) == {0: 0.0, 1: 0.0}
    assert statistics.latent_frame_change(latents[:, :, :1], prompts) == {}  # images: undefined
