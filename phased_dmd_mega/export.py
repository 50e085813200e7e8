"""``phased-dmd export``: the distilled generators of a training checkpoint -> Hugging Face folders.

A K-phase generator is K experts, one per group of sampling steps. What is written:

- 1 phase (any teacher): full weights go to one transformer folder (the destination); LoRA to
  ``pytorch_lora_weights.safetensors`` (original layout: ``lora.safetensors``).
- 2 phases from a Wan teacher: full weights go to ``transformer/`` + ``transformer_2/`` +
  model_index.json with ``boundary_ratio`` (original layout: ``high_noise_model/`` +
  ``low_noise_model/``); LoRA to ``transformer_lora.safetensors`` + ``transformer_2_lora.safetensors``
  (original: ``high_noise_model_lora.safetensors`` + ``low_noise_model_lora.safetensors``).
- 2 or more phases otherwise: ``phase_0/``, ``phase_1/``, ...: one transformer folder per phase;
  LoRA to ``phase_<k>_lora.safetensors``.

Full weights follow ``--layout``; LoRA files are diffusers' PEFT files, or in the original layout
the Wan-Video / ComfyUI keys.

Every export also holds ``phased_dmd.json``: the step table (timesteps, shift), which folder or
LoRA file serves which steps, the base expert each LoRA sits on, and where the weights came from.
A run with a student (``model.student_path``) exports at the student's size: its folders are
student-sized diffusers transformers, its config.json fields come from the student's, and its
LoRA files sit on the student (``lora.base`` in phased_dmd.json), not the teacher.
``phased-dmd sample --exported`` reads it; a diffusers user reads the timesteps from it.

Two transformers and ``boundary_ratio``: diffusers' Wan pipelines run a step at timestep t (0..1000)
with ``transformer`` when ``t >= boundary_ratio * 1000``, else with ``transformer_2``. Phase 0 is
``transformer``, so the ratio must lie above the first step time of phase 1 and at or below the
last step time of phase 0 (Wan, 4 steps, shift 5: in (0.8333, 0.9375]). It is set to the midpoint
of the two (0.8854 there), the widest margin on both sides for schedulers whose step times differ
a little from the training table. The teacher's own boundary (0.875) is not reused: with shift 7
phase 1 starts exactly at 0.875, which ``t >= 0.875`` would send to the wrong transformer.

Full weights are converted by the converter's own machinery (the architecture's rule table and
sharded writer, ``convert.write_model``); LoRA adapters on megatron's fused linears become one
PEFT pair per diffusers linear (a fused q/k/v adapter: the same A for all three, B split by
rows like the weight), with ``lora_alpha`` and ``r`` in the file's ``lora_adapter_metadata`` as
diffusers' ``save_lora_weights`` writes them, so ``load_lora_weights`` reproduces the scale
alpha / r. In the original layout (Wan) the same pairs carry the original Wan module names the
way Wan-Video tools and ComfyUI read LoRA files: ``diffusion_model.<module>.lora_down.weight``
(A), ``.lora_up.weight`` (B) and a scalar ``.alpha``. ``--merge`` writes W + (alpha / r) B A as
full weights instead.

Output is built in a hidden folder beside the destination and renamed at the end; an existing
destination needs ``overwrite``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from phased_dmd_mega import __version__, convert
from phased_dmd_mega.distill.generators import DistilledGenerators
from phased_dmd_mega.errors import RequestError
from phased_dmd_mega.files import check_destination, read_json, staging_folder, write_json
from phased_dmd_mega.log import get_logger
from phased_dmd_mega.models.architectures import CheckpointError
from phased_dmd_mega.models.checkpoints import (
    EXPERT_FOLDERS,
    CheckpointView,
    ModelFiles,
    check_weights,
    inspect_checkpoint,
)
from phased_dmd_mega.models.shards import DEFAULT_MAX_SHARD_BYTES
from phased_dmd_mega.models.weights import StateDictReader, split_interleaved_heads
from phased_dmd_mega.schedule import PhaseLayout

log = get_logger(__name__)

PathLike = Union[str, Path]
EXPORT_INFO = "phased_dmd.json"
EXPORT_FORMAT = "phased-dmd-export"
EXPORT_FORMAT_VERSION = 1
LAYOUTS = ("diffusers", "original")
SINGLE_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight_name
LORA_PREFIX = "transformer"  # diffusers' LoRA loaders take "transformer." keys, transformer_2 included
LORA_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps LoraConfig fields in a safetensors header
ORIGINAL_LORA_PREFIX = "diffusion_model"  # Wan-Video / ComfyUI LoRA keys: diffusion_model.<original module>...
ORIGINAL_SINGLE_LORA_FILE = "lora.safetensors"


# ----------------------------------------------------------------------------- where each phase goes


@dataclass(frozen=True)
class Slot:
    """Where phase ``phase``'s generator is written."""

    phase: int
    folder: str  # its full-weight folder, relative to the export ("." for the export itself)
    lora_file: str  # its LoRA file
    pipeline_expert: Optional[str] = None  # "high" / "low" inside a two-transformer pipeline


def plan_slots(num_phases: int, architecture, layout: str = "diffusers") -> List[Slot]:
    """One slot per phase (the table of the module docstring)."""
    if num_phases == 1:
        return [Slot(0, ".", SINGLE_LORA_FILE if layout == "diffusers" else ORIGINAL_SINGLE_LORA_FILE)]
    if num_phases == 2 and architecture.experts is not None:
        folders = EXPERT_FOLDERS[layout]
        return [Slot(k, folders[e], f"{folders[e]}_lora.safetensors", e) for k, e in enumerate(("high", "low"))]
    return [Slot(k, f"phase_{k}", f"phase_{k}_lora.safetensors") for k in range(num_phases)]


def pipeline_boundary_ratio(layout: PhaseLayout) -> float:
    """The ``boundary_ratio`` that routes every step of phase 0 to ``transformer`` and every
    step of phase 1 to ``transformer_2`` (module docstring: why the midpoint)."""
    if layout.num_phases != 2:
        raise RequestError(f"a two-transformer pipeline holds 2 phases, not {layout.num_phases}")
    last_of_phase_0 = layout.times[layout.steps_of_phase(0)[-1]]
    first_of_phase_1 = layout.times[layout.steps_of_phase(1)[0]]
    return (last_of_phase_0 + first_of_phase_1) / 2


# ----------------------------------------------------------------------------- export


def export_generators(
    distilled: DistilledGenerators,
    dst: PathLike,
    *,
    layout: str = "diffusers",
    merge: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``distilled`` (opened at tensor parallel 1) to ``dst`` as the module docstring says:
    full weights in ``layout``, or, for LoRA generators, PEFT LoRA files (``merge``: full
    weights with the adapters folded in)."""
    from phased_dmd_mega import parallel

    if parallel.layout().tensor_parallel != 1 or parallel.layout().ulysses_parallel != 1:
        raise RequestError("export runs at tensor and Ulysses parallel 1 (open the checkpoint in one process)")
    architecture = distilled.architecture
    if layout not in architecture.hf_layouts:
        raise CheckpointError(
            f"{architecture.title} has no {layout!r} layout (it has {', '.join(architecture.hf_layouts)})"
        )
    as_lora = distilled.lora and not merge
    if merge and not distilled.lora:
        raise RequestError(f"--merge folds LoRA adapters into the weights, but {distilled.path} holds full generators")
    slots = plan_slots(distilled.layout.num_phases, architecture, layout)
    if as_lora:
        _check_lora_bases(distilled, slots)
    dst = Path(dst)
    check_destination(distilled.path, dst, overwrite, CheckpointError)
    with staging_folder(dst, overwrite, CheckpointError) as staging:
        for slot in slots:
            generator = distilled.generators[slot.phase].high
            if as_lora:
                log.info("phase %d: LoRA adapters -> %s", slot.phase, slot.lora_file)
                _write_lora(staging / slot.lora_file, generator, distilled, layout)
            else:
                log.info("phase %d: %s weights -> %s", slot.phase, "merged" if merge else "full", slot.folder)
                files = _model_files(distilled, slot.phase, _plain_parameters(generator))
                convert.write_model(staging / slot.folder, files, layout, 1, max_shard_bytes)
        if not as_lora and slots[0].pipeline_expert is not None and layout == "diffusers":
            index = convert.model_index(
                architecture,
                distilled.dims,
                pipeline_boundary_ratio(distilled.layout),
                _base_pipeline_index(distilled),
            )
            write_json(staging / "model_index.json", index)
        elif not as_lora and slots[0].pipeline_expert is not None:
            log.warning(
                "the original Wan layout stores no boundary: give Wan's own sampler boundary %.6g "
                "(phased_dmd.json), not its default",
                pipeline_boundary_ratio(distilled.layout),
            )
        write_json(staging / EXPORT_INFO, export_info(distilled, slots, layout, as_lora, merge))
    log.info(
        "exported %s (iteration %d%s) to %s", distilled.path, distilled.iteration, ", EMA" if distilled.ema else "", dst
    )
    return dst


def _plain_parameters(model) -> Dict[str, torch.Tensor]:
    """A generator's weights under the plain model's parameter names (LoRA: merged)."""
    from phased_dmd_mega.models.lora import AdapterView, merged_parameters

    if isinstance(model, AdapterView):
        return merged_parameters(model)
    return {name: param.detach() for name, param in model.named_parameters()}


def _model_files(distilled: DistilledGenerators, phase: int, tensors: Dict[str, torch.Tensor]) -> ModelFiles:
    """The generator's tensors seen as a checkpoint in the trainer's own layout (full tensors
    under the model's names), checked like any checkpoint, so the converter writes them."""
    architecture, dims = distilled.architecture, distilled.dims
    reader = StateDictReader(tensors, f"{distilled.path} generator{phase}")
    view = CheckpointView(reader, "mega", architecture, dims)
    check_weights(view, dims, str(reader.folder))
    # The base's config (the student's, or the teacher's) goes along as the source: fields that
    # do not shape the weights (rope_max_seq_len, _diffusers_version, ...) are kept in the
    # exported config.json.
    config = {"provenance": _base_provenance(distilled, distilled.base_experts[phase])}
    return ModelFiles(reader.folder, "mega", dims, config, view)


def _base_provenance(distilled: DistilledGenerators, expert: str) -> Dict[str, Any]:
    path = distilled.base_path
    if path is None:
        return {}
    base = inspect_checkpoint(path)
    folder = base.model_folder(expert if base.has_experts else None)  # expert: "model" for one
    config = read_json(folder / "config.json", CheckpointError)
    if base.layout == "mega":
        return config.get("provenance", {})
    return {"source": str(folder.resolve()), "source_layout": base.layout, "source_config": config}


def _base_pipeline_index(distilled: DistilledGenerators) -> Optional[Dict[str, Any]]:
    path = distilled.base_path
    return None if path is None else convert.pipeline_source_index(inspect_checkpoint(path))


# ----------------------------------------------------------------------------- LoRA


def _check_lora_bases(distilled: DistilledGenerators, slots: List[Slot]) -> None:
    """A LoRA file is only right on the weights it was trained on: in a two-transformer
    pipeline of a two-expert teacher, transformer's must sit on the high-noise expert and
    transformer_2's on the low-noise one."""
    if distilled.teacher_boundary is None:
        return
    for slot in slots:
        base = distilled.base_experts[slot.phase]
        if slot.pipeline_expert is not None and base != slot.pipeline_expert:
            raise RequestError(
                f"phase {slot.phase}'s LoRA was trained on the teacher's {base}-noise expert, but the pipeline runs it "
                f"on {EXPERT_FOLDERS['diffusers'][slot.pipeline_expert]} (the {slot.pipeline_expert}-noise expert): "
                f"export with --merge for full weights"
            )


def lora_state(view, distilled: DistilledGenerators) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """PEFT tensors (``transformer.<diffusers module>.lora_A.weight`` / ``lora_B.weight``) and
    the LoraConfig fields of one LoRA generator (an AdapterView at tensor parallel 1)."""
    from phased_dmd_mega.models.lora import adapter_layers

    rules = {rule.own: rule for rule in distilled.architecture.weight_rules(distilled.dims)}
    tensors: Dict[str, torch.Tensor] = {}
    for path, pair in adapter_layers(view):
        rule = rules[f"{path}.weight"]
        modules = [source[: -len(".weight")] for source in rule.sources]
        a, b = pair.lora_A.detach(), pair.lora_B.detach()
        # A fused linear's rows are its projections interleaved per head; B's rows follow them.
        parts = split_interleaved_heads(b, len(modules), rule.head_dim) if len(modules) > 1 else [b]
        for module, b_part in zip(modules, parts):
            tensors[f"{LORA_PREFIX}.{module}.lora_A.weight"] = a.clone()  # one copy per module: PEFT keeps one each
            tensors[f"{LORA_PREFIX}.{module}.lora_B.weight"] = b_part.contiguous()
    lora = distilled.config.model.lora
    targets = sorted(
        {key[len(LORA_PREFIX) + 1 : -len(".lora_A.weight")] for key in tensors if key.endswith("lora_A.weight")}
    )
    # The project scales by (alpha or rank) / rank (models.lora); PEFT by lora_alpha / r.
    config = {"r": lora.rank, "lora_alpha": lora.alpha or lora.rank, "target_modules": targets}
    return tensors, config


def original_lora_state(
    tensors: Dict[str, torch.Tensor], config: Dict[str, Any], architecture
) -> Dict[str, torch.Tensor]:
    """:func:`lora_state`'s pairs under the original Wan module names, as Wan-Video tools and
    ComfyUI read them: ``diffusion_model.<module>.lora_down.weight`` (A), ``.lora_up.weight``
    (B) and the scalar ``.alpha`` (their scale is alpha / rank, as PEFT's)."""
    modules = config["target_modules"]
    names = architecture.original.names([f"{module}.weight" for module in modules])
    alpha = torch.tensor(float(config["lora_alpha"]))
    out: Dict[str, torch.Tensor] = {}
    for module in modules:
        original = f"{ORIGINAL_LORA_PREFIX}.{names[f'{module}.weight'][: -len('.weight')]}"
        out[f"{original}.lora_down.weight"] = tensors[f"{LORA_PREFIX}.{module}.lora_A.weight"]
        out[f"{original}.lora_up.weight"] = tensors[f"{LORA_PREFIX}.{module}.lora_B.weight"]
        out[f"{original}.alpha"] = alpha.clone()
    return out


def _write_lora(path: Path, view, distilled: DistilledGenerators, layout: str = "diffusers") -> None:
    from safetensors.torch import save_file

    tensors, config = lora_state(view, distilled)
    if layout == "original":
        save_file(original_lora_state(tensors, config, distilled.architecture), str(path), metadata={"format": "pt"})
        return
    packed = {f"{LORA_PREFIX}.{key}": value for key, value in config.items()}
    save_file(tensors, str(path), metadata={"format": "pt", LORA_METADATA_KEY: json.dumps(packed, sort_keys=True)})


# ----------------------------------------------------------------------------- phased_dmd.json


def export_info(
    distilled: DistilledGenerators, slots: List[Slot], layout: str, as_lora: bool, merge: bool
) -> Dict[str, Any]:
    steps = distilled.layout
    phases = []
    for slot in slots:
        entry = {
            "phase": slot.phase,
            "steps": list(steps.steps_of_phase(slot.phase)),
            "timesteps": [1000.0 * steps.times[i] for i in steps.steps_of_phase(slot.phase)],
        }
        if as_lora:
            entry.update(lora=slot.lora_file, base_expert=distilled.base_experts[slot.phase])
        else:
            entry["model"] = slot.folder
        phases.append(entry)
    info: Dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "family": distilled.architecture.name,
        "weights": "lora" if as_lora else ("merged" if merge else "full"),
        "layout": layout,
        "dtype": str(next(distilled.generators[0].parameters()).dtype).removeprefix("torch."),
        "num_steps": steps.num_steps,
        "steps_per_phase": list(steps.steps_per_phase),
        "shift": steps.shift,
        "step_rule": distilled.config.phases.step_rule,
        "sigmas": list(steps.times),  # t of each step, then 0
        "timesteps": [1000.0 * t for t in steps.times[:-1]],  # the model's timestep input at each step
        "phases": phases,
        "source": {
            "checkpoint": str(Path(distilled.path).resolve()),
            "iteration": distilled.iteration,
            "ema": distilled.ema,
            "teacher_path": distilled.config.model.teacher_path,
            "student_path": distilled.config.model.student_path,
        },
        "exporter": f"phased-dmd-mega {__version__}",
    }
    if slots[0].pipeline_expert is not None:
        info["boundary_ratio"] = pipeline_boundary_ratio(steps)
    if as_lora:
        lora = distilled.config.model.lora
        info["lora"] = {"rank": lora.rank, "alpha": lora.alpha or lora.rank, "base": distilled.base_path}
    return info


def read_export_info(folder: PathLike) -> Dict[str, Any]:
    """An export's ``phased_dmd.json``, checked."""
    info = read_json(Path(folder) / EXPORT_INFO, CheckpointError)
    if info.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{Path(folder) / EXPORT_INFO}: format {info.get('format')!r} is not {EXPORT_FORMAT!r}")
    if info.get("format_version") != EXPORT_FORMAT_VERSION:
        raise CheckpointError(
            f"{Path(folder) / EXPORT_INFO}: format_version {info.get('format_version')} "
            f"(this version reads {EXPORT_FORMAT_VERSION})"
        )
    return info


def export_layout(info: Dict[str, Any]) -> PhaseLayout:
    """The phase layout an export was trained with."""
    return PhaseLayout.build(info["num_steps"], steps_per_phase=info["steps_per_phase"], shift=info["shift"])


def open_export(folder: PathLike, dtype: Optional[str] = None, attention_backend: str = "auto"):
    """The generators of a full-weight export, built for the current parallel state, its phase
    layout and its ``phased_dmd.json``. ``dtype``: the models' (default: the exported weights')."""
    from phased_dmd_mega import parallel
    from phased_dmd_mega.distill.roles import Experts
    from phased_dmd_mega.models import load_pretrained

    folder = Path(folder)
    info = read_export_info(folder)
    if info["weights"] == "lora":
        raise RequestError(
            f"{folder} holds LoRA files, which need their base model: sample from the training "
            f"checkpoint ({info['source']['checkpoint']}), or export it with --merge"
        )
    torch_dtype = getattr(torch, dtype or info["dtype"])
    device = parallel.layout().device
    generators = []
    for phase in sorted(info["phases"], key=lambda entry: entry["phase"]):
        model = load_pretrained(folder / phase["model"], dtype=torch_dtype, attention_backend=attention_backend)
        generators.append(Experts(model.to(device).requires_grad_(False).eval()))
    return generators, export_layout(info), info
