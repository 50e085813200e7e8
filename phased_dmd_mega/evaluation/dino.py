"""DINO similarity among the seeds of a prompt (``--dino PATH``): the paper's diversity measure,
lower = more diverse.

Any transformers DINOv2 / DINOv3 folder (``config.json``, the weights, ``preprocessor_config.json``)
is loaded with ``AutoModel`` / ``AutoImageProcessor`` from that local path only
(``local_files_only``: nothing is downloaded). A sample's embedding is the model's pooled output
(``pooler_output``: the layer-normed CLS token of DINOv2 and DINOv3; the first token of the last
hidden state for a model without one), on the frames ``--frames`` selects: the middle frame of a
video (default) or every frame, where the cosine of two seeds is that of their frame k with
frame k, averaged over k. The score of a prompt is the mean cosine over its pairs of seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from phased_dmd_mega.evaluation.errors import EvaluationError
from phased_dmd_mega.evaluation.statistics import PerPrompt, pairwise_cosine, select_frames, uint8_frames

OPTION = "--dino"


def check_dino_folder(path) -> Path:
    """``path`` as a DINO folder, or an EvaluationError naming --dino."""
    folder = Path(path)
    if not folder.is_dir():
        raise EvaluationError(f"{OPTION} {path}: no such folder (give a local transformers DINOv2/DINOv3 folder)")
    for name in ("config.json", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise EvaluationError(f"{OPTION} {path}: {name} is missing (a transformers DINOv2/DINOv3 folder has it)")
    return folder


class DinoEmbedder:
    """The model and its image processor; ``embed`` turns images into pooled embeddings."""

    def __init__(self, model, processor, device: torch.device, batch_size: int = 16):
        self.model, self.processor, self.device, self.batch_size = model, processor, device, batch_size

    @classmethod
    def load(cls, path, device="cpu", batch_size: int = 16) -> "DinoEmbedder":
        folder = check_dino_folder(path)
        from transformers import AutoImageProcessor, AutoModel

        try:
            model = AutoModel.from_pretrained(str(folder), local_files_only=True)
            processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise EvaluationError(f"{OPTION} {path}: transformers cannot load it: {err}") from err
        device = torch.device(device)
        return cls(model.to(device).eval(), processor, device, batch_size)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [M, H, W, 3] (or floats in [0, 1]) -> float32 [M, D] on the CPU."""
        images = uint8_frames(images)
        dtype = next(self.model.parameters()).dtype
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = [image.numpy() for image in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            result = self.model(pixel_values=pixels.to(self.device, dtype))
            pooled: Optional[torch.Tensor] = getattr(result, "pooler_output", None)
            if pooled is None:
                pooled = result.last_hidden_state[:, 0]
            out.append(pooled.float().cpu())
        return torch.cat(out)


def dino_cosine(embedder: DinoEmbedder, frames: torch.Tensor, prompt_index, mode: str = "middle") -> PerPrompt:
    """Mean pairwise cosine of the seeds' DINO embeddings per prompt (frames [N, F, H, W, 3])."""
    chosen = select_frames(frames, mode)
    count, per_sample = chosen.shape[:2]
    embeddings = embedder.embed(chosen.reshape(count * per_sample, *chosen.shape[2:]))
    return pairwise_cosine(embeddings.reshape(count, per_sample, -1), prompt_index)
