"""``phased-dmd encode-prompts``: prompts -> the prompt-embedding cache the trainer reads.

The prompts (prompts.py) are encoded as each family's diffusers pipeline encodes them before the
DiT (text_encoders.py); image-to-video rows also get their first frame's image condition
(first_frames.py). The cache (format.py, writer.py) is stamped with a fingerprint of the inputs
(prompt list, encoder and tokenizer files, settings): a re-run with the same inputs skips the
finished shards, other inputs are refused (``overwrite`` replaces the cache). Under torchrun each
rank encodes every world-size-th shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch

from phased_dmd_mega import parallel
from phased_dmd_mega.data import ImageConditionSpec
from phased_dmd_mega.log import get_logger
from phased_dmd_mega.progress import Progress
from phased_dmd_mega.prompt_cache.errors import PromptEncodingError
from phased_dmd_mega.prompt_cache.first_frames import FirstFrameEncoder, parse_resolutions
from phased_dmd_mega.prompt_cache.format import (
    DTYPES,
    NEGATIVE_FILE,
    RowLayout,
    dtype_name,
    index_fingerprint,
    make_index,
    negative_prompt,
)
from phased_dmd_mega.prompt_cache.prompts import PromptRows, read_prompt_rows
from phased_dmd_mega.prompt_cache.text_encoders import FAMILIES, TextEncoder, resolve_encoder_folders
from phased_dmd_mega.prompt_cache.writer import (
    Shard,
    file_fingerprint,
    plan_shards,
    prepare_folder,
    publish_index,
    replace_cache,
    write_rows,
)

log = get_logger(__name__)
T = TypeVar("T")


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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or torch.distributed.is_initialized():
        return parallel.global_rank(), parallel.world_size(), False
    # Only barriers go through it; a rank's share of the encoding may take hours.
    torch.distributed.init_process_group("gloo", timeout=timedelta(hours=48))
    return parallel.global_rank(), parallel.world_size(), True


def _on_rank_zero(step: Callable[[], T], rank: int, world: int) -> T:
    """``step`` on rank 0 while the others wait; what it returns, or its PromptEncodingError,
    on every rank."""
    outcome = [None, None]  # result, error message
    if rank == 0:
        try:
            outcome = [step(), None]
        except PromptEncodingError as err:
            outcome = [None, str(err)]
    if world > 1:
        torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise PromptEncodingError(outcome[1])
    return outcome[0]


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
        "dtype": dtype_name(dtype),
        "negative_prompt": negative,
        "shard_size": opts.shard_size,
        "prompts": prompts_digest,
    }
    if images is not None:
        settings["images"] = {**images.settings(), "files": _images_digest(rows)}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    source = {
        "prompts": str(Path(opts.prompts).resolve()),
        "text_encoder": str(encoder.encoder_folder.resolve()),
        "tokenizer": str(encoder.tokenizer_folder.resolve()),
    }
    if images is not None:
        source["vae"] = str(images.folder.resolve())
    index = make_index(
        RowLayout(encoder.family, encoder.dim, encoder.pad_to, encoder.masked),
        dtype=settings["dtype"],
        count=len(prompts),
        fingerprint=fingerprint,
        settings=settings,
        source=source,
        negative_prompt=negative,
    )
    if images is not None:
        index.update(ImageConditionSpec.index_entries(images.specs))
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
        # The folder itself, or (replacing a cache of other inputs) the one its replacement is built in.
        target = _on_rank_zero(lambda: prepare_folder(folder, index, opts.overwrite), rank, world)
        shards = plan_shards(len(rows.prompts), opts.shard_size)
        _encode_missing(target, encoder, images, opts, rows, shards, index, dtype, rank, world)
        parallel.barrier()
        if rank == 0:
            publish_index(target, index, shards)
            if target != folder:
                replace_cache(target, folder)
        parallel.barrier()
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return folder


def _encode_missing(
    folder: Path,
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
    fingerprint = str(index_fingerprint(index))
    done = lambda path: file_fingerprint(path) == fingerprint  # noqa: E731
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
    if need_negative:
        write_rows(folder / NEGATIVE_FILE, encoder.encode([negative_prompt(index)]), fingerprint)
    progress = Progress(sum(s.count for s in todo), "encoding", "prompt", rank=rank)
    try:
        for shard in todo:
            embeddings, first_frames = _encode_shard(encoder, images, opts, rows, shard, dtype, progress)
            metadata = {"shard": str(shard.number), "first_row": str(shard.start)}
            write_rows(folder / shard.file, embeddings, fingerprint, metadata, first_frames)
    finally:
        progress.close()
    log.info(
        "encoded %d prompts in %d shards (%.1f prompts/s on rank %d)", progress.done, len(todo), progress.rate, rank
    )


def _encode_shard(
    encoder: TextEncoder,
    images: Optional[FirstFrameEncoder],
    opts: EncodeOptions,
    rows: PromptRows,
    shard: Shard,
    dtype: torch.dtype,
    progress: Progress,
) -> Tuple[List[torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
    """The shard's trimmed embeddings, and its rows' first-frame latents by shard tensor (I2V)."""
    embeddings: List[torch.Tensor] = []
    first_frames: List[Dict[str, torch.Tensor]] = []  # per row: tensor name -> latents
    for start in range(shard.start, shard.stop, opts.batch_size):
        stop = min(start + opts.batch_size, shard.stop)
        embeddings.extend(encoder.encode(rows.prompts[start:stop]))
        if images is not None:  # one video at a time, as the pipeline encodes it; kept in the cache's dtype
            for i in range(start, stop):
                latents = images.encode(rows.images[i], f"row {i + 1} of --prompts {opts.prompts}")
                first_frames.append({name: value.to(dtype) for name, value in latents.items()})
        progress.update(stop - start)
    if images is None:
        return embeddings, None
    return embeddings, {spec.tensor: torch.stack([f[spec.tensor] for f in first_frames]) for spec in images.specs}
