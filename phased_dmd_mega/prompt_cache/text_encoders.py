"""The text encoders of encode-prompts: prompt -> trimmed [L, D] embeddings, as each family's
diffusers pipeline computes them (diffusers 0.42.1).

- Wan (``WanPipeline._get_t5_prompt_embeds``): the prompt is cleaned (ftfy when installed, HTML
  unescaped twice, whitespace collapsed), tokenized to 512 tokens (padded, truncated), encoded by
  umT5 (``last_hidden_state``) and trimmed to its true token count; the pipeline then zero-pads
  to 512, which the cache reader does on load.
- Qwen-Image (``QwenImagePipeline._get_qwen_prompt_embeds``): the prompt goes into the chat
  template, is tokenized (at most 1024 + 34 tokens, padded to the batch's longest), encoded by
  Qwen2.5-VL (last hidden state), the template's first 34 tokens are dropped, and at most
  ``max_sequence_length`` tokens (512, the pipeline's default) are kept, with a mask.
"""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import torch

from phased_dmd_mega.files import component_folder
from phased_dmd_mega.models.architectures import get_architecture
from phased_dmd_mega.prompt_cache.errors import PromptEncodingError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def resolve_encoder_folders(text_encoder, tokenizer=None) -> Tuple[Path, Path]:
    """(text encoder folder, tokenizer folder) from a text encoder folder or a diffusers pipeline
    root (``text_encoder/`` + ``tokenizer/``); the tokenizer defaults to the pipeline's
    ``tokenizer/``, the encoder folder's ``tokenizer/``, the encoder folder itself, or its sibling."""
    root = Path(text_encoder)
    if not root.is_dir():
        raise PromptEncodingError(f"--text-encoder {root} is not a folder")
    encoder = component_folder(root, "text_encoder")
    if encoder is None:
        raise PromptEncodingError(
            f"--text-encoder {root}: no config.json (expected a Hugging Face text encoder "
            "folder or a diffusers pipeline root with text_encoder/)"
        )
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        if not tokenizer.is_dir():
            raise PromptEncodingError(f"--tokenizer {tokenizer} is not a folder")
        return encoder, tokenizer
    for candidate in (root / "tokenizer", encoder / "tokenizer", encoder, encoder.parent / "tokenizer"):
        if (candidate / "tokenizer_config.json").is_file():
            return encoder, candidate
    raise PromptEncodingError(
        f"no tokenizer found beside --text-encoder {root} (no tokenizer_config.json in "
        "tokenizer/, the folder itself or ../tokenizer); pass --tokenizer"
    )


def _is_weight(path: Path) -> bool:
    return path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json")


def encoder_digest(folder: Path) -> str:
    """Its config.json, and its weight files' names and sizes (reading gigabytes to hash them
    would cost as much as a shard of encoding)."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(p for p in folder.iterdir() if p.is_file() and _is_weight(p)):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def tokenizer_digest(folder: Path) -> str:
    """Every file of the tokenizer folder but weights."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not _is_weight(p)):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class TextEncoder:
    """One family's prompt -> trimmed [L, D] embeddings, as its diffusers pipeline computes them."""

    family: ClassVar[str]
    model_types: ClassVar[Tuple[str, ...]]  # config.json model_type values accepted
    wanted: ClassVar[str]  # for messages
    masked: ClassVar[bool]  # rows are padded per batch with a mask (else zero-padded to pad_to)
    default_negative: ClassVar[str]
    default_max_length: ClassVar[int]
    longest_max_length: ClassVar[int]

    def __init__(self, encoder: Path, tokenizer: Path, max_sequence_length: Optional[int] = None):
        self.encoder_folder, self.tokenizer_folder = Path(encoder), Path(tokenizer)
        self.max_sequence_length = max_sequence_length or self.default_max_length
        if not 1 <= self.max_sequence_length <= self.longest_max_length:
            raise PromptEncodingError(
                f"--max-sequence-length {self.max_sequence_length}: {self.family} takes 1 to "
                f"{self.longest_max_length} tokens"
            )
        self.config = json.loads((self.encoder_folder / "config.json").read_text())
        model_type = self.config.get("model_type")
        if model_type not in self.model_types:
            raise PromptEncodingError(
                f"--text-encoder {self.encoder_folder} is a {model_type!r} model (config.json "
                f"model_type); --family {self.family} needs {self.wanted}"
            )
        self.model = self.tokenizer = None

    @property
    def pad_to(self) -> Optional[int]:
        return None if self.masked else self.max_sequence_length

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def settings(self) -> Dict[str, object]:
        """Everything that decides the embeddings (the resume fingerprint covers it)."""
        return {
            "family": self.family,
            "max_sequence_length": self.max_sequence_length,
            "encoder": encoder_digest(self.encoder_folder),
            "tokenizer": tokenizer_digest(self.tokenizer_folder),
        }

    def load(self, dtype: torch.dtype, device: torch.device) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_folder))
        self.model = self.model_class().from_pretrained(str(self.encoder_folder), dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)

    def model_class(self):
        """transformers' class of the family's text encoder (its Architecture record names it)."""
        import transformers

        return getattr(transformers, get_architecture(self.family, "text encoder").text_encoder_class)

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> List[torch.Tensor]:
        """Trimmed embeddings [L_i, D] on the CPU, in the encoder's dtype."""
        raise NotImplementedError


def clean_wan_prompt(text: str) -> str:
    """WanPipeline's prompt_clean: ftfy (when installed), HTML unescaped twice, whitespace collapsed."""
    import regex  # a dependency of transformers; its \\s is the one diffusers uses

    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def _ftfy_version() -> Optional[str]:
    try:
        import ftfy
    except ImportError:
        return None
    return getattr(ftfy, "__version__", "unknown")


class WanTextEncoder(TextEncoder):
    family = "wan"
    model_types = ("umt5",)
    wanted = "umT5 (UMT5EncoderModel, model_type 'umt5')"
    masked = False
    default_negative = ""  # WanPipeline's default
    default_max_length = 512
    longest_max_length = 512

    @property
    def dim(self) -> int:
        return int(self.config["d_model"])

    def settings(self):
        return {**super().settings(), "cleaning": {"ftfy": _ftfy_version()}}

    @torch.inference_mode()
    def encode(self, prompts):
        tokens = self.tokenizer(
            [clean_wan_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        hidden = self.model(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
        lengths = tokens.attention_mask.gt(0).sum(dim=1).tolist()
        return [h[:n].to("cpu", copy=True) for h, n in zip(hidden, lengths)]


class QwenImageTextEncoder(TextEncoder):
    family = "qwen_image"
    model_types = ("qwen2_5_vl",)
    wanted = "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration, model_type 'qwen2_5_vl')"
    masked = True
    default_negative = " "  # what Qwen-Image's examples pass; the pipeline has no CFG without one
    default_max_length = 512  # QwenImagePipeline.__call__'s max_sequence_length
    longest_max_length = 1024  # the pipeline refuses more
    template = (
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
        "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    drop_tokens = 34  # the template's system part and "<|im_start|>user\n"
    tokenizer_max_length = 1024

    @property
    def dim(self) -> int:
        text = self.config.get("text_config") or {}
        return int(text.get("hidden_size") or self.config["hidden_size"])

    def settings(self):
        return {**super().settings(), "template": self.template, "drop_tokens": self.drop_tokens}

    @torch.inference_mode()
    def encode(self, prompts):
        tokens = self.tokenizer(
            [self.template.format(p) for p in prompts],
            padding=True,
            truncation=True,
            max_length=self.tokenizer_max_length + self.drop_tokens,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        out = self.model(
            input_ids=tokens.input_ids.to(device),
            attention_mask=tokens.attention_mask.to(device),
            output_hidden_states=True,
        )
        hidden, mask = out.hidden_states[-1], tokens.attention_mask.to(device).bool()
        return [h[m][self.drop_tokens :][: self.max_sequence_length].to("cpu", copy=True) for h, m in zip(hidden, mask)]


FAMILIES: Dict[str, type] = {cls.family: cls for cls in (WanTextEncoder, QwenImageTextEncoder)}
