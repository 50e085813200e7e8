"""``phased-dmd encode-prompts``: prompts -> the prompt-embedding cache the trainer reads.

Each family encodes exactly as its diffusers pipeline does before the DiT (diffusers 0.42.1):
- Wan (``WanPipeline._get_t5_prompt_embeds``): the prompt is cleaned (ftfy when installed, HTML
  unescaped twice, whitespace collapsed), tokenized to 512 tokens (padded, truncated), encoded by
  umT5 (``last_hidden_state``) and trimmed to its true token count; the pipeline then zero-pads
  to 512, which the cache reader does on load.
- Qwen-Image (``QwenImagePipeline._get_qwen_prompt_embeds``): the prompt goes into the chat
  template, is tokenized (at most 1024 + 34 tokens, padded to the batch's longest), encoded by
  Qwen2.5-VL (last hidden state), the template's first 34 tokens are dropped, and at most
  ``max_sequence_length`` tokens (512, the pipeline's default) are kept, with a mask.

Image-to-video (Wan2.2 I2V, ``--vae``): rows that name a first-frame image also get the image
condition of ``WanImageToVideoPipeline.prepare_latents`` (no last image, ``expand_timesteps`` off
as in Wan2.2-I2V-A14B, which has no CLIP image encoder): the image is resized by the pipeline's
``VideoProcessor`` to each ``--resolution`` (one or several: a run's resolution mixture),
followed by black frames to the resolution's frame count, encoded by ``AutoencoderKLWan`` (the
distribution's mode) and normalised with the VAE's ``latents_mean``/``latents_std``; the latents
[C, F, h, w] of each resolution are stored with the row, the mask channels are rebuilt by the
reader (data.ImageConditionSpec).

Writing: one safetensors shard per ``shard_size`` prompts (format: phased_dmd_mega/data.py),
each published by an atomic rename and stamped with a fingerprint of the inputs (prompt list,
encoder and tokenizer files, settings). ``prompts.json`` says ``complete: false`` until every
shard is there; a re-run with the same inputs skips the finished shards, other inputs are refused
(``overwrite`` replaces the cache). Under torchrun each rank encodes every world-size-th shard.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch

from phased_dmd_mega.data import (
    PROMPT_CACHE_FORMAT,
    PROMPT_CACHE_INDEX,
    PROMPT_CACHE_VERSION,
    ImageConditionSpec,
    resolution_text,
)
from phased_dmd_mega.log import get_logger

log = get_logger(__name__)

NEGATIVE_FILE = "negative.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


class PromptEncodingError(ValueError):
    """Bad input to encode-prompts; the message names the file or option at fault."""


# ----------------------------------------------------------------------------- prompt files


@dataclass
class PromptRows:
    """The rows of a prompt file: their prompts, and first-frame images when the rows name them."""

    prompts: List[str]
    images: Optional[List[Path]] = None  # resolved paths (relative ones against the file's folder)
    image_names: Optional[List[str]] = None  # as written in the file (the resume fingerprint's)


def read_prompts(path, field: str = "prompt") -> List[str]:
    """Prompts from a .txt file (one per line, blank lines skipped), a .jsonl file (one object
    with ``field`` per line, or one string), a .csv file with a ``field`` column, or a .json list."""
    return read_prompt_rows(path, field).prompts


def read_prompt_rows(path, field: str = "prompt", image_field: Optional[str] = None) -> PromptRows:
    """``read_prompts``, with each row's first-frame image from ``image_field`` (an object field
    or a csv column) when given: every row names an existing image file, or none does."""
    path = Path(path)
    if not path.is_file():
        raise PromptEncodingError(f"--prompts {path} does not exist")
    readers = {".txt": _text_prompts, ".jsonl": _jsonl_prompts, ".csv": _csv_prompts, ".json": _json_prompts}
    if path.suffix.lower() not in readers:
        raise PromptEncodingError(f"--prompts {path}: unknown kind {path.suffix!r} (use .txt, .jsonl, .csv or .json)")
    try:
        items = readers[path.suffix.lower()](path, field)
    except UnicodeDecodeError as err:
        raise PromptEncodingError(f"--prompts {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not items:
        raise PromptEncodingError(f"--prompts {path} holds no prompts")
    rows = PromptRows([_prompt_of(item, where, field) for where, item in items])
    if image_field:
        names = [_image_of(item, where, image_field) for where, item in items]
        given = [name is not None for name in names]
        if any(given):
            if not all(given):
                where = items[given.index(False)][0]
                raise PromptEncodingError(
                    f"{where}: no {image_field!r} image, but other rows name one: every row "
                    "needs its first-frame image, or none"
                )
            rows.image_names = names
            rows.images = [_existing_image(path.parent / name, where) for name, (where, _) in zip(names, items)]
    return rows


def _image_of(item, where: str, field: str) -> Optional[str]:
    if not isinstance(item, dict) or item.get(field) in (None, ""):
        return None
    if not isinstance(item[field], str):
        raise PromptEncodingError(f"{where}: the {field!r} field must be an image path")
    return item[field]


def _existing_image(path: Path, where: str) -> Path:
    if not path.is_file():
        raise PromptEncodingError(f"{where}: image {path} does not exist")
    return path


def _text_prompts(path: Path, field: str) -> List[Tuple[str, object]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(f"{path} line {n}", line) for n, line in enumerate(lines, start=1) if line.strip()]


def _prompt_of(item, where: str, field: str) -> str:
    if isinstance(item, dict) and isinstance(item.get(field), str):
        return item[field]
    if isinstance(item, str):
        return item
    raise PromptEncodingError(f"{where}: expected a string or an object with a string {field!r} field")


def _jsonl_prompts(path: Path, field: str) -> List[Tuple[str, object]]:
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise PromptEncodingError(f"{path} line {number}: not JSON ({err.msg})") from err
    return items


def _json_prompts(path: Path, field: str) -> List[Tuple[str, object]]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PromptEncodingError(f"{path} line {err.lineno}: not JSON ({err.msg})") from err
    if not isinstance(items, list):
        raise PromptEncodingError(f"{path}: expected a JSON list of prompts")
    return [(f"{path} item {i}", item) for i, item in enumerate(items)]


def _csv_prompts(path: Path, field: str) -> List[Tuple[str, object]]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if field not in (reader.fieldnames or []):
            raise PromptEncodingError(f"{path}: no {field!r} column (columns: {reader.fieldnames})")
        return [
            (f"{path} row {n}", row)
            for n, row in enumerate(reader, start=1)
            if row[field] is not None and row[field].strip()
        ]


# ----------------------------------------------------------------------------- encoder folders


def resolve_encoder_folders(text_encoder, tokenizer=None) -> Tuple[Path, Path]:
    """(text encoder folder, tokenizer folder) from a text encoder folder or a diffusers pipeline
    root (``text_encoder/`` + ``tokenizer/``); the tokenizer defaults to the pipeline's
    ``tokenizer/``, the encoder folder's ``tokenizer/``, the encoder folder itself, or its sibling."""
    root = Path(text_encoder)
    if not root.is_dir():
        raise PromptEncodingError(f"--text-encoder {root} is not a folder")
    encoder = root / "text_encoder" if (root / "text_encoder" / "config.json").is_file() else root
    if not (encoder / "config.json").is_file():
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


# ----------------------------------------------------------------------------- text encoders


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
        raise NotImplementedError

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

    def model_class(self):
        from transformers import UMT5EncoderModel

        return UMT5EncoderModel

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

    def model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

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


# ----------------------------------------------------------------------------- first frames (I2V)


RESIZE_MODES = ("default", "crop", "fill")  # diffusers VaeImageProcessor's; the pipeline uses "default"


def parse_resolution(text: str) -> Tuple[int, int, int]:
    """``"81x480x832"`` -> (frames, height, width)."""
    parts = str(text).lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise PromptEncodingError(
            f"--resolution {text!r}: expected FRAMESxHEIGHTxWIDTH of positive integers, e.g. 81x480x832"
        )
    frames, height, width = (int(p) for p in parts)
    return frames, height, width


def parse_resolutions(text: str) -> List[Tuple[int, int, int]]:
    """``"81x480x832,81x832x480"`` (the CLI's repeated --resolution) -> the resolutions, in order."""
    resolutions = [parse_resolution(part.strip()) for part in str(text).split(",")]
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
        self.folder = root / "vae" if (root / "vae" / "config.json").is_file() else root
        if not (self.folder / "config.json").is_file():
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
        latent_shape = (
            int(self.config.get("z_dim", 16)),
            (frames - 1) // temporal + 1,
            height // spatial,
            width // spatial,
        )
        return ImageConditionSpec(
            resolution,
            latent_shape,
            mask_channels=temporal,
            spatial=spatial,
            tensor=ImageConditionSpec.tensor_name(resolution),
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
        return {spec.tensor: self._encode_at(picture, spec.resolution) for spec in self.specs}

    @torch.inference_mode()
    def _encode_at(self, picture, resolution: Tuple[int, int, int]) -> torch.Tensor:
        frames, height, width = resolution
        device = next(self.vae.parameters()).device
        pixels = self.processor.preprocess(picture, height=height, width=width, resize_mode=self.resize_mode)
        pixels = pixels.to(device, torch.float32).unsqueeze(2)  # [1, 3, 1, H, W]
        video = torch.cat([pixels, pixels.new_zeros(1, 3, frames - 1, height, width)], dim=2)
        latents = self.vae.encode(video).latent_dist.mode().float()
        # As prepare_latents normalises: (x - mean) * (1 / std).
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32, device=device).view(shape)
        inverse_std = 1.0 / torch.tensor(self.vae.config.latents_std, dtype=torch.float32, device=device).view(shape)
        return ((latents - mean) * inverse_std)[0].to("cpu", copy=True)


# ----------------------------------------------------------------------------- the cache folder


@dataclass(frozen=True)
class Shard:
    number: int
    start: int
    stop: int

    @property
    def file(self) -> str:
        return f"shard-{self.number:05d}.safetensors"

    @property
    def count(self) -> int:
        return self.stop - self.start


def plan_shards(count: int, shard_size: int) -> List[Shard]:
    return [Shard(n, start, min(start + shard_size, count)) for n, start in enumerate(range(0, count, shard_size))]


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_rows(
    path: Path, rows: Sequence[torch.Tensor], metadata: Dict[str, str], extra: Optional[Dict[str, torch.Tensor]] = None
) -> None:
    """Trimmed rows -> one safetensors file (``context`` + ``offsets``, and ``extra`` tensors such
    as the rows' first-frame latents), published atomically."""
    from safetensors.torch import save_file

    lengths = torch.tensor([0] + [r.shape[0] for r in rows], dtype=torch.int64)
    tensors = {"context": torch.cat(list(rows)).contiguous(), "offsets": lengths.cumsum(0)}
    tensors.update({name: tensor.contiguous() for name, tensor in (extra or {}).items()})
    _write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_embeddings_cache(
    folder,
    rows: Sequence[torch.Tensor],
    negative: torch.Tensor,
    family: str = "wan",
    pad_to: Optional[int] = None,
    masked: bool = False,
    source: str = "precomputed",
) -> Path:
    """A prompt cache from embeddings computed elsewhere (rows [L_i, D], negative [L, D]): one
    shard, the same index as ``encode-prompts`` writes. Refuses an existing folder."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise PromptEncodingError(f"{folder} exists and is not empty")
    dims = {r.shape[-1] for r in rows} | {negative.shape[-1]}
    if len(dims) != 1 or any(r.dim() != 2 for r in [*rows, negative]):
        raise PromptEncodingError(f"embeddings must all be [tokens, D] with one D, got {sorted(dims)}")
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(b"".join(r.float().numpy().tobytes() for r in [*rows, negative])).hexdigest()
    stamp = {"fingerprint": digest}
    write_rows(folder / NEGATIVE_FILE, [negative], stamp)
    shard = "shard-00000.safetensors"
    write_rows(folder / shard, list(rows), stamp)
    _write_index(
        folder,
        {
            "format": PROMPT_CACHE_FORMAT,
            "version": PROMPT_CACHE_VERSION,
            "complete": True,
            "family": family,
            "dim": dims.pop(),
            "pad_to": pad_to,
            "masked": masked,
            "dtype": str(rows[0].dtype).removeprefix("torch."),
            "count": len(rows),
            "fingerprint": digest,
            "settings": {"source": source},
            "source": {"embeddings": source},
            "negative": {"file": NEGATIVE_FILE, "prompt": None},
            "shards": [{"file": shard, "count": len(rows)}],
        },
    )
    return folder


def _file_fingerprint(path: Path) -> Optional[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("fingerprint")
    except Exception:  # a file that is not safetensors (or a torn one) counts as not written
        return None


def _write_index(folder: Path, index: Dict[str, object]) -> None:
    _write_atomically(folder / PROMPT_CACHE_INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1) + "\n"))


def _cache_files(folder: Path) -> List[Path]:
    return [
        p
        for p in folder.iterdir()
        if p.name == PROMPT_CACHE_INDEX
        or p.name == NEGATIVE_FILE
        or (p.name.startswith("shard-") and p.suffix == ".safetensors")
        or ".tmp" in p.name
    ]


def prepare_folder(folder: Path, index: Dict[str, object], overwrite: bool) -> None:
    """Create the cache folder, or check that the one there holds these inputs (resume)."""
    index_file = folder / PROMPT_CACHE_INDEX
    if index_file.is_file():
        old = json.loads(index_file.read_text())
        if old.get("fingerprint") == index["fingerprint"]:
            if not old.get("complete"):
                _write_index(folder, index)  # resume: the finished shards are found by their stamp
            return
        if not overwrite:
            changed = sorted(k for k, v in index["settings"].items() if old.get("settings", {}).get(k) != v)
            raise PromptEncodingError(
                f"--out {folder} holds a prompt cache of other inputs (differing: "
                f"{', '.join(changed) or 'format'}); pass --overwrite to replace it, "
                "or choose another --out"
            )
        for path in _cache_files(folder):
            path.unlink()
    elif folder.exists() and any(folder.iterdir()):
        raise PromptEncodingError(
            f"--out {folder} exists, is not empty and is not a prompt cache; choose another --out"
        )
    folder.mkdir(parents=True, exist_ok=True)
    _write_index(folder, index)


# ----------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar on a terminal, else a log line every ``every`` seconds; both with prompts/s."""

    def __init__(self, total: int, enabled: bool, every: float = 30.0):
        self.total, self.done, self.enabled, self.every = total, 0, enabled, every
        self.start = self.last = time.perf_counter()
        self.bar = None
        if enabled and os.isatty(2):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="prompt", desc="encoding", dynamic_ncols=True)

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.enabled and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            log.info("encoded %d/%d prompts (%.1f prompts/s)", self.done, self.total, self.rate)

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- the command


@dataclass
class EncodeOptions:
    family: str
    text_encoder: str
    prompts: str
    out: str
    tokenizer: Optional[str] = None
    negative_prompt: Optional[str] = None  # None: the family's default
    batch_size: int = 8
    shard_size: int = 1000
    dtype: str = "bf16"
    device: Optional[str] = None  # None: this rank's GPU, else the CPU
    max_sequence_length: Optional[int] = None  # None: the family's pipeline default
    prompt_field: str = "prompt"
    overwrite: bool = False
    # Image-to-video (Wan2.2 I2V): rows name a first-frame image in ``image_field``.
    vae: Optional[str] = None  # AutoencoderKLWan folder (or a pipeline root with vae/)
    # FRAMESxHEIGHTxWIDTH, or several separated by commas; None: the pipeline's 81x480x832.
    resolution: Optional[str] = None
    image_field: str = "image"
    resize_mode: str = "default"  # the pipeline's resize; or crop / fill (diffusers' resize modes)


DEFAULT_RESOLUTION = "81x480x832"  # WanImageToVideoPipeline's num_frames x height x width


def _check_options(opts: EncodeOptions) -> torch.dtype:
    if opts.family not in FAMILIES:
        raise PromptEncodingError(f"--family {opts.family!r}: choose one of {', '.join(FAMILIES)}")
    if opts.batch_size < 1 or opts.shard_size < 1:
        raise PromptEncodingError("--batch-size and --shard-size must be >= 1")
    if opts.dtype not in DTYPES:
        raise PromptEncodingError(f"--dtype {opts.dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[opts.dtype]


def _distributed() -> Tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size(), False) if dist.is_initialized() else (0, 1, False)
    # Only barriers go through it; a rank's share of the encoding may take hours.
    dist.init_process_group("gloo", timeout=timedelta(hours=48))
    return dist.get_rank(), dist.get_world_size(), True


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _on_rank_zero(step: Callable[[], None], rank: int, world: int) -> None:
    """``step`` on rank 0 while the others wait; its PromptEncodingError is raised on every rank."""
    error = [None]
    if rank == 0:
        try:
            step()
        except PromptEncodingError as err:
            error = [str(err)]
    if world > 1:
        torch.distributed.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise PromptEncodingError(error[0])


def _device(requested: Optional[str]) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def first_frame_encoder(opts: EncodeOptions, rows: PromptRows) -> Optional[FirstFrameEncoder]:
    """The image encoder when the rows name first frames; images and --vae go together."""
    if rows.images is None:
        if opts.vae is not None:
            raise PromptEncodingError(
                f"--vae is given but no row of --prompts {opts.prompts} names a first-frame "
                f"image (field or column {opts.image_field!r}, see --image-field)"
            )
        if opts.resolution is not None:
            raise PromptEncodingError("--resolution is for first-frame images (with --vae) only")
        return None
    if opts.family != "wan":
        raise PromptEncodingError(
            f"--prompts {opts.prompts} names first-frame images: image conditions are for "
            f"--family wan (Wan2.2 I2V), not {opts.family}"
        )
    if opts.vae is None:
        raise PromptEncodingError(
            f"the rows of --prompts {opts.prompts} name first-frame images (field "
            f"{opts.image_field!r}) but no --vae is given: pass --vae (an AutoencoderKLWan "
            "folder) and --resolution to encode them"
        )
    return FirstFrameEncoder(opts.vae, parse_resolutions(opts.resolution or DEFAULT_RESOLUTION), opts.resize_mode)


def _images_digest(rows: PromptRows) -> str:
    """The images as the prompt file names them, with their sizes (as encoder_digest does for weights)."""
    entries = [f"{name}:{path.stat().st_size}" for name, path in zip(rows.image_names, rows.images)]
    return hashlib.sha256(json.dumps(entries, ensure_ascii=False).encode()).hexdigest()


def _index(
    encoder: TextEncoder,
    opts: EncodeOptions,
    rows: PromptRows,
    dtype: torch.dtype,
    negative: str,
    images: Optional[FirstFrameEncoder],
) -> Dict[str, object]:
    prompts = rows.prompts
    prompts_digest = hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()
    settings = {
        **encoder.settings(),
        "dtype": str(dtype).removeprefix("torch."),
        "negative_prompt": negative,
        "shard_size": opts.shard_size,
        "prompts": prompts_digest,
    }
    if images is not None:
        settings["images"] = {**images.settings(), "files": _images_digest(rows)}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    index = {
        "format": PROMPT_CACHE_FORMAT,
        "version": PROMPT_CACHE_VERSION,
        "complete": False,
        "family": encoder.family,
        "dim": encoder.dim,
        "pad_to": encoder.pad_to,
        "masked": encoder.masked,
        "dtype": settings["dtype"],
        "count": len(prompts),
        "fingerprint": fingerprint,
        "settings": settings,
        "source": {
            "prompts": str(Path(opts.prompts).resolve()),
            "text_encoder": str(encoder.encoder_folder.resolve()),
            "tokenizer": str(encoder.tokenizer_folder.resolve()),
        },
        "negative": {"file": NEGATIVE_FILE, "prompt": negative},
        "shards": [],
    }
    if images is not None:
        index["image_conditions"] = [spec.to_index() for spec in images.specs]
        index["source"]["vae"] = str(images.folder.resolve())
    return index


def encode_prompts(opts: EncodeOptions) -> Path:
    """Write (or finish) the prompt cache ``opts.out``; returns its folder."""
    dtype = _check_options(opts)
    rows = read_prompt_rows(opts.prompts, opts.prompt_field, opts.image_field)
    images = first_frame_encoder(opts, rows)
    encoder_folder, tokenizer_folder = resolve_encoder_folders(opts.text_encoder, opts.tokenizer)
    encoder: TextEncoder = FAMILIES[opts.family](encoder_folder, tokenizer_folder, opts.max_sequence_length)
    negative = encoder.default_negative if opts.negative_prompt is None else opts.negative_prompt
    folder = Path(opts.out)
    index = _index(encoder, opts, rows, dtype, negative, images)
    rank, world, started = _distributed()
    try:
        _on_rank_zero(lambda: prepare_folder(folder, index, opts.overwrite), rank, world)
        shards = plan_shards(len(rows.prompts), opts.shard_size)
        _encode_missing(encoder, images, opts, rows, shards, index, dtype, rank, world)
        _barrier(world)
        if rank == 0:
            _publish_index(folder, index, shards)
        _barrier(world)
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return folder


def _encode_missing(
    encoder: TextEncoder,
    images: Optional[FirstFrameEncoder],
    opts: EncodeOptions,
    rows: PromptRows,
    shards: List[Shard],
    index: Dict[str, object],
    dtype: torch.dtype,
    rank: int,
    world: int,
) -> None:
    folder, fingerprint, prompts = Path(opts.out), str(index["fingerprint"]), rows.prompts
    done = lambda path: _file_fingerprint(path) == fingerprint  # noqa: E731
    todo = [s for s in shards[rank::world] if not done(folder / s.file)]
    need_negative = rank == 0 and not done(folder / NEGATIVE_FILE)
    skipped = len(shards[rank::world]) - len(todo)
    if skipped:
        log.info("resuming: %d of %d shards are already written", skipped, len(shards[rank::world]))
    if not todo and not need_negative:
        return
    device = _device(opts.device)
    log.info("loading the %s text encoder from %s on %s (%s)", encoder.family, encoder.encoder_folder, device, dtype)
    encoder.load(dtype, device)
    if images is not None and todo:
        log.info(
            "loading the VAE from %s on %s (float32): first frames at %s", images.folder, device, images.describe()
        )
        images.load(device)
    stamp = {"fingerprint": fingerprint}
    if need_negative:
        write_rows(folder / NEGATIVE_FILE, encoder.encode([index["negative"]["prompt"]]), stamp)
    progress = Progress(sum(s.count for s in todo), enabled=rank == 0)
    try:
        for shard in todo:
            embeddings: List[torch.Tensor] = []
            first_frames: List[Dict[str, torch.Tensor]] = []  # per row: tensor name -> latents
            for start in range(shard.start, shard.stop, opts.batch_size):
                stop = min(start + opts.batch_size, shard.stop)
                embeddings.extend(encoder.encode(prompts[start:stop]))
                if images is not None:  # one video at a time, as the pipeline encodes it; kept in the cache's dtype
                    for i in range(start, stop):
                        latents = images.encode(rows.images[i], f"row {i + 1} of --prompts {opts.prompts}")
                        first_frames.append({name: value.to(dtype) for name, value in latents.items()})
                progress.update(stop - start)
            extra = None
            if images is not None:
                extra = {spec.tensor: torch.stack([f[spec.tensor] for f in first_frames]) for spec in images.specs}
            write_rows(
                folder / shard.file,
                embeddings,
                {**stamp, "shard": str(shard.number), "first_row": str(shard.start)},
                extra,
            )
    finally:
        progress.close()
    log.info(
        "encoded %d prompts in %d shards (%.1f prompts/s on rank %d)", progress.done, len(todo), progress.rate, rank
    )


def _publish_index(folder: Path, index: Dict[str, object], shards: List[Shard]) -> None:
    """The final index, once every shard carries this run's fingerprint."""
    from safetensors import safe_open

    entries = []
    for shard in shards:
        path = folder / shard.file
        if _file_fingerprint(path) != index["fingerprint"]:
            raise RuntimeError(f"{path} is missing or stale after encoding; re-run the command to finish the cache")
        with safe_open(str(path), framework="pt") as handle:
            tokens = int(handle.get_slice("context").get_shape()[0])
        entries.append({"file": shard.file, "count": shard.count, "tokens": tokens})
    _write_index(folder, {**index, "complete": True, "shards": entries})
    size = sum((folder / e["file"]).stat().st_size for e in entries) / 1e9
    log.info("prompt cache %s: %d prompts, %d shards, %.2f GB", folder, index["count"], len(entries), size)
