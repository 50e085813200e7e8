"""The installed `phased-dmd` console script."""

import shutil
import subprocess
import sys

import pytest

SUBCOMMANDS = ["train", "sample", "convert", "export", "encode-prompts", "evaluate"]


def phased_dmd(*args):
    # The console script installed next to this interpreter (the package's entry point).
    script = shutil.which("phased-dmd", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert script, "the phased-dmd console script is not installed next to the test interpreter"
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    result = phased_dmd("--help")
    assert result.returncode == 0, result.stderr
    for name in SUBCOMMANDS:
        assert name in result.stdout


def test_unknown_subcommand_is_a_usage_error():
    result = phased_dmd("frobnicate")
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


def test_no_subcommand_is_a_usage_error():
    result = phased_dmd()
    assert result.returncode == 2 and "usage:" in result.stderr


def test_train_dry_run_prints_the_resolved_config():
    result = phased_dmd("train", "--config", "examples/configs/tiny_cpu.yaml", "--dry-run", "phases.num_steps=8")
    assert result.returncode == 0, result.stderr
    assert "num_steps: 8" in result.stdout and "name: tiny_cpu" in result.stdout


def test_train_reports_a_bad_config_with_the_key_and_source():
    result = phased_dmd("train", "--dry-run", "phases.num_phases=3")
    assert result.returncode == 2
    assert "configuration error: phases.num_phases: 3 does not divide num_steps 4" in result.stderr
    assert "command-line override 'phases.num_phases=3'" in result.stderr


@pytest.mark.parametrize("name, required", [("sample", "--output"), ("export", "--checkpoint")])
def test_sample_and_export_need_their_source_and_destination(name, required):
    result = phased_dmd(name)
    assert result.returncode == 2 and "the following arguments are required" in result.stderr
    assert required in result.stderr


def test_a_command_that_fails_inside_reports_one_line_and_exit_status_1(monkeypatch, capsys):
    from phased_dmd_mega import cli
    from phased_dmd_mega.distill import trainer

    def train(cfg):
        raise ValueError("the teacher folder holds no weights")

    monkeypatch.setattr(trainer, "train", train)
    assert cli.main(["train", "--config", "examples/configs/tiny_cpu.yaml"]) == 1
    err = capsys.readouterr().err
    assert "phased-dmd train: error: the teacher folder holds no weights" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("error", "status"),
    [("ValueError", 1), ("RequestError", 2), ("CheckpointError", 2), ("FileNotFoundError", 2)],
)
def test_export_reports_bad_input_as_usage_and_a_failure_inside_as_status_1(monkeypatch, capsys, error, status):
    from phased_dmd_mega import cli
    from phased_dmd_mega.distill import generators
    from phased_dmd_mega.errors import RequestError
    from phased_dmd_mega.models.architecture_types import CheckpointError

    errors = {
        "ValueError": ValueError,
        "RequestError": RequestError,
        "CheckpointError": CheckpointError,
        "FileNotFoundError": FileNotFoundError,
    }

    def open_generators(*args, **kwargs):
        raise errors[error]("the latents have 16 channels, the VAE decodes 48")

    monkeypatch.setattr(generators, "open_generators", open_generators)
    assert cli.main(["export", "--checkpoint", "ckpt", "--dst", "out"]) == status
    err = capsys.readouterr().err
    assert "phased-dmd export: error: the latents have 16 channels" in err and "Traceback" not in err


@pytest.mark.parametrize("direction", ["hf-to-mega", "mega-to-hf"])
def test_convert_takes_the_deprecated_arch_as_expect_and_hides_it(monkeypatch, capsys, direction):
    from phased_dmd_mega import cli, convert

    calls = []
    for name in ("hf_to_mega", "mega_to_hf"):
        monkeypatch.setattr(convert, name, lambda src, dst, **kwargs: calls.append(kwargs) or dst)
    common = ["convert", direction, "--src", "in", "--dst", "out"]
    assert cli.main([*common, "--expect", "wan2.1-t2v-1.3b"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert cli.main([*common, "--arch", "qwen_image"]) == 0
    assert "warning: --arch is deprecated; use --expect" in capsys.readouterr().err
    assert cli.main(common) == 0
    assert [kwargs["expect"] for kwargs in calls] == ["wan2.1-t2v-1.3b", "qwen_image", "wan"]
    with pytest.raises(SystemExit):
        cli.main(["convert", direction, "--help"])
    help_text = capsys.readouterr().out
    assert "--expect" in help_text and "--arch" not in help_text
