"""First-frame images of image-to-video prompts (Wan2.2 I2V, ``encode-prompts --vae``) -> the image
condition of ``WanImageToVideoPipeline.prepare_latents`` (no last image, ``expand_timesteps`` off
as in Wan2.2-I2V-A14B, which has no CLIP image encoder): the image is resized by the pipeline's
``VideoProcessor`` to each ``--resolution`` (one or several: a run's resolution mixture),
followed by black frames to the resolution's frame count, encoded by ``AutoencoderKLWan`` (the
distribution's mode) and normalised with the VAE's ``latents_mean``/``latents_std``; the latents
[C, F, h, w] of each resolution are stored with the row, the mask channels are rebuilt by the
reader (data.ImageConditionSpec). The Wan2.2 VAE's pipeline (Wan2.2-TI2V-5B, ``expand_timesteps``
on) encodes the image alone instead: its latents [C, 1, h, w] replace the first latent frame
(``vae.WanVAE.image_condition``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from phased_dmd_mega.data import FIRST_FRAME, ImageConditionSpec, parse_resolution, resolution_text
from phased_dmd_mega.prompt_cache.errors import PromptEncodingError
from phased_dmd_mega.prompt_cache.text_encoders import encoder_digest
from phased_dmd_mega.vae import find_vae_folder, normalize, wan_vae

RESIZE_MODES = ("default", "crop", "fill")  # diffusers VaeImageProcessor's; the pipeline uses "default"


def _resolution(text: str) -> Tuple[int, int, int]:
    resolution = parse_resolution(text)
    if resolution is None:
        raise PromptEncodingError(
            f"--resolution {text!r}: expected FRAMESxHEIGHTxWIDTH of positive integers, e.g. 81x480x832"
        )
    return resolution


def parse_resolutions(text: str) -> List[Tuple[int, int, int]]:
    """``"81x480x832,81x832x480"`` (the CLI's repeated --resolution) -> the resolutions, in order."""
    resolutions = [_resolution(part.strip()) for part in str(text).split(",")]
    repeated = sorted({r for r in resolutions if resolutions.count(r) > 1})
    if repeated:
        raise PromptEncodingError(f"--resolution {resolution_text(repeated[0])} is given twice")
    return resolutions


class FirstFrameEncoder:
    """A first-frame image -> the latents of WanImageToVideoPipeline's image condition [C, F, h, w]
    at each resolution (float32, on the CPU). The VAE runs in float32, as the pipeline's examples
    load it."""

    def __init__(self, vae, resolutions: Sequence[Tuple[int, int, int]], resize_mode: str = "default"):
        root = Path(vae)
        self.folder = find_vae_folder(root)
        if self.folder is None:
            raise PromptEncodingError(
                f"--vae {root}: no config.json (expected an AutoencoderKLWan folder or a "
                "diffusers pipeline root with vae/)"
            )
        self.config = json.loads((self.folder / "config.json").read_text())
        if self.config.get("_class_name") != "AutoencoderKLWan":
            raise PromptEncodingError(
                f"--vae {self.folder} is a {self.config.get('_class_name')!r} (config.json "
                "_class_name); Wan image conditions need an AutoencoderKLWan"
            )
        if resize_mode not in RESIZE_MODES:
            raise PromptEncodingError(f"--resize-mode {resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
        self.resize_mode = resize_mode
        self.specs = [self._spec(tuple(resolution)) for resolution in resolutions]
        self.vae = self.processor = None

    def _spec(self, resolution: Tuple[int, int, int]) -> ImageConditionSpec:
        temporal = int(self.config.get("scale_factor_temporal") or 4)
        spatial = int(self.config.get("scale_factor_spatial") or 8)
        frames, height, width = resolution
        if (frames - 1) % temporal or height % spatial or width % spatial:
            raise PromptEncodingError(
                f"--resolution {resolution_text(resolution)}: the VAE {self.folder} compresses time by "
                f"{temporal} and space by {spatial}, so frames must be {temporal}k + 1 and height and width "
                f"multiples of {spatial}"
            )
        channels = int(self.config.get("z_dim", 16))
        kind = wan_vae(channels).image_condition
        latent_frames = 1 if kind == FIRST_FRAME else (frames - 1) // temporal + 1
        return ImageConditionSpec(
            resolution,
            (channels, latent_frames, height // spatial, width // spatial),
            mask_channels=0 if kind == FIRST_FRAME else temporal,
            spatial=spatial,
            tensor=ImageConditionSpec.tensor_name(resolution),
            kind=kind,
            temporal=temporal,
        )

    def describe(self) -> str:
        return ", ".join(spec.describe() for spec in self.specs)

    def settings(self) -> Dict[str, object]:
        return {
            "vae": encoder_digest(self.folder),
            "resolutions": [list(spec.resolution) for spec in self.specs],
            "resize_mode": self.resize_mode,
            "vae_dtype": "float32",
        }

    def load(self, device: torch.device) -> None:
        from diffusers import AutoencoderKLWan
        from diffusers.video_processor import VideoProcessor

        self.vae = AutoencoderKLWan.from_pretrained(str(self.folder), torch_dtype=torch.float32).to(device).eval()
        self.vae.requires_grad_(False)
        self.processor = VideoProcessor(vae_scale_factor=self.specs[0].spatial)  # the pipeline's

    def encode(self, image: Path, where: str) -> Dict[str, torch.Tensor]:
        """The image's latents at every resolution, keyed by their shard tensor's name."""
        from diffusers.utils import load_image

        try:
            picture = load_image(str(image))  # EXIF orientation applied, RGB
        except Exception as err:  # PIL raises several kinds for files it cannot read
            raise PromptEncodingError(f"{where}: cannot read image {image} ({type(err).__name__}: {err})") from err
        return {spec.tensor: self._encode_at(picture, spec) for spec in self.specs}

    @torch.inference_mode()
    def _encode_at(self, picture, spec: ImageConditionSpec) -> torch.Tensor:
        frames, height, width = spec.resolution
        device = next(self.vae.parameters()).device
        pixels = self.processor.preprocess(picture, height=height, width=width, resize_mode=self.resize_mode)
        pixels = pixels.to(device, torch.float32).unsqueeze(2)  # [1, 3, 1, H, W]
        video = pixels  # the first frame alone ("first_frame"), or followed by black frames
        if spec.kind != FIRST_FRAME:
            video = torch.cat([pixels, pixels.new_zeros(1, 3, frames - 1, height, width)], dim=2)
        latents = self.vae.encode(video).latent_dist.mode().float()
        return normalize(self.vae.config, latents)[0].to("cpu", copy=True)
