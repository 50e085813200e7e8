"""`phased-dmd evaluate` end to end, through cli.main, on sample folders written with sample.py's
own writers: a diverse moving set, a collapsed static one and a latents-only one; then the
refusals (exit status 1, one line naming the option or file, nothing written)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from phased_dmd_mega import cli
from phased_dmd_mega.evaluation.arguments import DEFAULT_DYNAMIC_THRESHOLD
from phased_dmd_mega.evaluation.errors import EvaluationError
from phased_dmd_mega.evaluation.grid import LABEL, PAD, TITLE
from phased_dmd_mega.evaluation.samples import set_names
from phased_dmd_mega.files import write_json
from phased_dmd_mega.sample import write_frames, write_latents

from helpers.evaluation_models import alexnet_state, lin_state, save_tiny_dino, shifted_video

PROMPTS, SEEDS = [0, 0, 0, 1, 1, 1], [10, 11, 12, 13, 14, 15]
FRAMES, HEIGHT, WIDTH = 4, 48, 64
LATENT = (4, 2, 6, 8)
TILE = 32


def write_folder(folder, latents, frames=None):
    """A folder as `phased-dmd sample` writes it (latents, frames, samples.json)."""
    folder.mkdir(parents=True)
    write_latents(folder, latents, PROMPTS, SEEDS)
    decoded = write_frames(folder, frames) if frames is not None else [{} for _ in PROMPTS]
    samples = [
        {"index": i, "prompt_index": p, "seed": s, **d} for i, (p, s, d) in enumerate(zip(PROMPTS, SEEDS, decoded))
    ]
    write_json(folder / "samples.json", {"step_rule": "euler", "latent_shape": list(LATENT), "samples": samples})
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    generator = torch.Generator().manual_seed(0)
    diverse_latents = torch.randn(len(PROMPTS), *LATENT, generator=generator)
    moving = torch.stack([shifted_video(FRAMES, HEIGHT, WIDTH, 1 + i % 3, seed=i) for i in range(len(PROMPTS))])
    one_still = shifted_video(FRAMES, HEIGHT, WIDTH, 0, seed=99)
    collapsed = one_still[None].expand(len(PROMPTS), -1, -1, -1, -1).contiguous()
    torch.save(alexnet_state(), root / "alexnet.pth")
    torch.save(lin_state(), root / "alex.pth")
    return {
        "root": root,
        "diverse_latents": diverse_latents,
        "teacher": write_folder(root / "teacher", diverse_latents, moving),
        "student": write_folder(root / "student", torch.randn(1, *LATENT).expand(6, -1, -1, -1, -1), collapsed),
        "latents": write_folder(root / "latents_only", torch.randn(len(PROMPTS), *LATENT, generator=generator)),
        "dino": save_tiny_dino(root / "dino"),
        "backbone": root / "alexnet.pth",
        "weights": root / "alex.pth",
    }


def evaluate(*args):
    return cli.main(["evaluate", *map(str, args)])


def model_options(inputs):
    return ["--dino", inputs["dino"], "--lpips-backbone", inputs["backbone"], "--lpips-weights", inputs["weights"]]


@pytest.fixture(scope="module")
def evaluated(inputs):
    pytest.importorskip("cv2", reason="--flow farneback needs OpenCV: pip install 'phased-dmd-mega[evaluate]'")
    out = inputs["root"] / "out"
    sets = [arg for name in ("teacher", "student", "latents") for arg in ("--samples", inputs[name])]
    status = evaluate(*sets, *model_options(inputs), "--flow", "farneback", "--tile-height", TILE, "--out", out)
    assert status == 0
    return out, json.loads((out / "evaluation.json").read_text())


def test_the_report_has_one_object_per_set_with_means_and_per_prompt_values(evaluated, inputs):
    _, report = evaluated
    teacher, student, latents_only = report["sets"]
    assert [s["name"] for s in report["sets"]] == ["teacher", "student", "latents_only"]
    assert teacher["seeds"] == {"0": [10, 11, 12], "1": [13, 14, 15]}
    assert teacher["frames"] == {"count": FRAMES, "height": HEIGHT, "width": WIDTH}
    # The latent spread against float64 pairs written out here.
    x = inputs["diverse_latents"].double()
    for prompt, members in (("0", [0, 1, 2]), ("1", [3, 4, 5])):
        pairs = [(a, b) for i, a in enumerate(members) for b in members[i + 1 :]]
        want = sum((x[a] - x[b]).pow(2).mean().sqrt().item() for a, b in pairs) / len(pairs)
        assert teacher["metrics"]["latent_spread"]["per_prompt"][prompt] == pytest.approx(want, rel=1e-9)
    spread = teacher["metrics"]["latent_spread"]
    assert spread["mean"] == pytest.approx(sum(spread["per_prompt"].values()) / 2)
    # The collapsed set: every seed the same picture, standing still.
    metrics = student["metrics"]
    assert metrics["latent_spread"]["mean"] == 0 and metrics["pixel_spread"]["mean"] == 0
    assert metrics["dino_cosine"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["lpips"]["mean"] == 0 and metrics["frame_change"]["mean"] == 0
    assert metrics["flow_magnitude"]["mean"] == pytest.approx(0, abs=0.02)
    assert metrics["dynamic_degree"]["mean"] == 0
    # The diverse, moving set: 1, 2 and 3 pixels per frame for the seeds of each prompt.
    assert teacher["metrics"]["dino_cosine"]["mean"] < 1 - 1e-4 and teacher["metrics"]["lpips"]["mean"] > 0
    assert teacher["metrics"]["flow_magnitude"]["per_prompt"]["0"] == pytest.approx(2.0, rel=0.05)
    # Latents only: the latent statistics, the rest skipped with the reason.
    latent_metrics = {"latent_spread", "latent_rms", "latent_frame_change"}
    assert set(latents_only["metrics"]) == latent_metrics and latents_only["frames"] is None
    assert {"dino_cosine", "lpips", "flow_magnitude", "clipped_fraction"} <= set(latents_only["skipped"])
    assert "latents only" in latents_only["skipped"]["dino_cosine"]
    used = report["used"]
    assert used["flow"] == "farneback" and used["dino"] == str(inputs["dino"].resolve())
    assert used["dynamic_threshold"] == 6.0 and used["frames"] == "middle"


def test_the_markdown_plots_and_grid(evaluated, inputs):
    out, report = evaluated
    table = (out / "evaluation.md").read_text()
    for name in ("teacher", "student", "latents_only"):
        assert f"| {name} |" in table
    assert "| set | latent spread | latent RMS | latent frame change | pixel spread | DINO cosine | LPIPS |" in table
    assert "latents_only: `dino_cosine`: latents only" in table
    for name in report["metrics"]:
        with Image.open(out / "plots" / f"{name}.png") as plot:
            assert plot.format == "PNG"
    # Three blocks of 2 prompts x 3 seeds; tiles 32 high, 64 x 48 frames (and 8 x 6 latents) -> 43 wide.
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (LABEL + 3 * (43 + PAD) + PAD, 3 * (TITLE + 2 * (TILE + PAD) + PAD))
        pixels = np.asarray(grid.convert("RGB"))
    assert pixels.std() > 10  # pictures, not a blank canvas
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "evaluation.md", "grid.png", "plots"]


def refused(capsys, *args, message):
    assert evaluate(*map(str, args)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"phased-dmd evaluate: error: {message}" in err or message in err, err
    return err


def test_a_missing_dino_path_is_refused_naming_the_option_and_nothing_is_written(inputs, capsys):
    out = inputs["root"] / "refused"
    err = refused(
        capsys, "--samples", inputs["teacher"], "--dino", inputs["root"] / "nope", "--out", out, message="--dino"
    )
    assert "nope" in err and not out.exists()
    out.mkdir()  # an empty --out stays empty
    refused(capsys, "--samples", inputs["teacher"], "--dino", inputs["root"] / "nope", "--out", out, message="--dino")
    assert list(out.iterdir()) == []
    refused(
        capsys,
        "--samples",
        inputs["teacher"],
        "--lpips-backbone",
        inputs["root"] / "no.pth",
        "--out",
        out,
        message="--lpips-backbone",
    )
    refused(
        capsys,
        "--samples",
        inputs["teacher"],
        "--lpips-backbone",
        inputs["backbone"],
        "--out",
        out,
        message="--lpips-weights",
    )  # the backbone file has no linear layers
    refused(
        capsys,
        "--samples",
        inputs["teacher"],
        "--lpips-weights",
        inputs["weights"],
        "--out",
        out,
        message="--lpips-weights needs --lpips-backbone",
    )
    assert list(out.iterdir()) == []


def test_sets_are_named_by_their_folders_or_by_name(tmp_path):
    paths = [tmp_path / "a" / "samples", tmp_path / "b" / "samples"]
    assert set_names(paths) == ["a/samples", "b/samples"]
    assert set_names([tmp_path / "x", tmp_path / "y"]) == ["x", "y"]
    assert set_names(paths, ["teacher", "student"]) == ["teacher", "student"]
    with pytest.raises(EvaluationError, match="--name was given 1 times for 2"):
        set_names(paths, ["teacher"])
    with pytest.raises(EvaluationError, match="two sets are named '.*/x': name them with --name"):
        set_names([tmp_path / "x", tmp_path / "x"])


def test_bad_sample_folders_are_refused_naming_the_file(inputs, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    refused(capsys, "--samples", empty, "--out", out, message=f"{empty / 'latents.safetensors'} is missing")
    short = write_folder(tmp_path / "short", torch.randn(6, *LATENT))
    record = json.loads((short / "samples.json").read_text())
    record["samples"].pop()
    (short / "samples.json").write_text(json.dumps(record))
    refused(capsys, "--samples", short, "--out", out, message=f"{short / 'samples.json'} lists 5 samples")
    holes = write_folder(tmp_path / "holes", torch.randn(6, *LATENT), torch.zeros(6, 1, 8, 8, 3, dtype=torch.uint8))
    (holes / "sample_0003.png").unlink()
    refused(capsys, "--samples", holes, "--out", out, message=f"{holes / 'sample_0003.png'} is missing")
    refused(
        capsys,
        "--samples",
        inputs["latents"],
        "--dino",
        inputs["dino"],
        "--out",
        out,
        message="--dino needs decoded frames",
    )
    assert not out.exists()


def test_an_existing_out_is_replaced_only_with_overwrite(inputs, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused(capsys, "--samples", inputs["latents"], "--out", out, message="already exists; pass --overwrite")
    assert evaluate("--samples", inputs["latents"], "--name", "only", "--out", out, "--overwrite") == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert [s["name"] for s in report["sets"]] == ["only"] and not (out / "keep.txt").exists()
    refused(capsys, "--samples", inputs["latents"], "--out", inputs["latents"] / "eval", message="overlaps")


def test_the_help_names_the_options_and_a_bad_flow_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as done:
        evaluate("--help")
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--samples", "--dino", "--lpips-backbone", "--lpips-weights", "--flow", "--dynamic-threshold"):
        assert option in help_text
    assert f"(default {DEFAULT_DYNAMIC_THRESHOLD})" in " ".join(help_text.split())
    with pytest.raises(SystemExit) as done:
        evaluate("--samples", "x", "--out", "y", "--flow", "lucas-kanade")
    assert done.value.code == 2 and "neither farneback nor raft:PATH" in capsys.readouterr().err
