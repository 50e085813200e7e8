"""Typed configuration: YAML, dotted overrides, and errors that name the key and the source."""

import logging

import pytest

from phased_dmd_mega.config import Config, ConfigError, dump_yaml, load_config

from helpers import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples" / "configs"


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_valid_and_follow_the_official_wan22_settings():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert (cfg.phases.num_steps, cfg.phases.num_phases) == (4, 2)
    assert cfg.phases.renoise_interval == "reverse_nested"
    assert cfg.phases.fake_updates_per_generator_update == 5
    assert (cfg.optimizer.generator.lr, cfg.optimizer.fake.lr) == (2e-6, 4e-7)
    assert cfg.optimizer.generator.betas == [0.0, 0.999]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path):
    load_config(path)


def test_yaml_then_overrides_with_types(tmp_path):
    path = write(tmp_path, "phases:\n  num_steps: 8\n  num_phases: 4\noptimizer:\n  generator:\n    lr: 1e-5\n")
    cfg = load_config(
        path, ["optimizer.generator.lr=3e-6", "parallel.sequence_parallel=true", "phases.weight_clamp=10"]
    )
    assert cfg.phases.num_steps == 8 and cfg.phases.num_phases == 4
    assert cfg.optimizer.generator.lr == 3e-6  # the override wins; "3e-6" (no dot) is a number
    assert cfg.parallel.sequence_parallel is True
    assert cfg.phases.weight_clamp == 10.0 and isinstance(cfg.phases.weight_clamp, float)
    assert cfg.optimizer.fake.lr == 4e-7  # untouched defaults stay


def test_override_replaces_a_list_of_sections():
    cfg = load_config(
        None,
        [
            "data.resolutions=[{frames: 81, height: 480, width: 832, probability: 0.5},"
            " {frames: 81, height: 832, width: 480, probability: 0.5}]"
        ],
    )
    assert [(r.height, r.width) for r in cfg.data.resolutions] == [(480, 832), (832, 480)]


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "phases:\n  num_step: 4\n")
    with pytest.raises(ConfigError, match=rf"phases.num_step: unknown key.*num_steps.*from file {path}"):
        load_config(path)


def test_unknown_section_from_an_override_names_the_override():
    with pytest.raises(ConfigError, match=r"optimiser: unknown key.*from command-line override 'optimiser.lr=1'"):
        load_config(None, ["optimiser.lr=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("phases.num_steps=four", r"phases.num_steps: expected an integer, got 'four'"),
        ("phases.num_steps=4.5", r"phases.num_steps: expected an integer, got 4.5"),
        ("parallel.sequence_parallel=1", r"parallel.sequence_parallel: expected true or false, got 1"),
        ("optimizer.generator.lr=fast", r"optimizer.generator.lr: expected a number, got 'fast'"),
        ("phases.renoise_interval=nested", r"phases.renoise_interval: must be one of 'reverse_nested', 'disjoint'"),
        ("optimizer.generator.betas=0.9", r"optimizer.generator.betas: expected a list, got 0.9"),
        ("optimizer=3", r"optimizer: expected a section \(mapping\), got 3"),
        ("data.resolutions=[{frames: x}]", r"data.resolutions\[0\].frames: expected an integer, got 'x'"),
    ],
)
def test_wrong_types_are_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message + r".*from command-line override"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["phases.num_phases=3"], r"phases.num_phases: 3 does not divide num_steps 4"),
        (["phases.steps_per_phase=[1, 2]"], r"phases.steps_per_phase: sums to 3 but num_steps is 4"),
        (["phases.steps_per_phase=[4]"], r"phases.steps_per_phase: has 1 entries but num_phases is 2"),
        (["phases.expert_boundary=1.5"], r"phases.expert_boundary: must be in \(0, 1\)"),
        (["phases.t_min=0.9", "phases.t_max=0.5"], r"phases.t_min: needs 0 <= t_min < t_max <= 1"),
        (["phases.renoise_shift=0"], r"phases.renoise_shift: must be > 0"),
        (["phases.iterations_by_phase=[10]"], r"phases.iterations_by_phase: has 1 entries but num_phases is 2"),
        (["phases.iterations_by_phase=[10, 0]"], r"phases.iterations_by_phase: every entry must be >= 1"),
        (["optimizer.generator.lr=0"], r"optimizer.generator.lr: must be > 0"),
        (["optimizer.fake.betas=[0.9, 1.0]"], r"optimizer.fake.betas: must be two values in \[0, 1\)"),
        (["parallel.tensor_parallel=0"], r"parallel.tensor_parallel: must be >= 1"),
        (["model.fp8_recipe=delayed"], r"model.fp8_recipe: needs model.transformer_impl=transformer_engine"),
        (
            ["model.attention_backend=flash", "model.dtype=float32"],
            r"model.attention_backend: flash needs model.dtype bfloat16 or float16 \(flash-attn refuses float32\)",
        ),
        (["data.resolutions=[{probability: 0.4}]"], r"data.resolutions: probabilities sum to 0.4, not 1"),
        (["data.batch_size=4", "data.micro_batch_size=3"], r"data.micro_batch_size: must divide batch_size 4, got 3"),
        (["data.batch_size=2", "data.micro_batch_size=4"], r"data.micro_batch_size: must divide batch_size 2, got 4"),
        (["checkpoint.keep_last=0"], r"checkpoint.keep_last: must be >= 1"),
    ],
)
def test_impossible_values_are_rejected_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_explicit_steps_per_phase_allow_uneven_phases():
    cfg = load_config(None, ["phases.num_steps=4", "phases.steps_per_phase=[1, 3]"])
    assert cfg.phases.steps_per_phase == [1, 3]


@pytest.mark.parametrize("override", ["phases.num_steps", "=3", "phases..x=1", "phases.num_steps.x=1"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError, match="command-line override"):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(write(tmp_path, "phases: [unclosed\n"))
    with pytest.raises(ConfigError, match="must hold a mapping at the top, got list"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_dumped_config_loads_back_identically(tmp_path):
    cfg = load_config(EXAMPLES / "tiny_cpu.yaml", ["phases.weight_clamp=5.0"])
    assert load_config(write(tmp_path, dump_yaml(cfg))) == cfg


@pytest.fixture
def config_warnings():
    """The messages the config loader logs at WARNING or above."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("phased_dmd_mega.config")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def test_model_arch_is_read_as_model_family_with_a_warning(tmp_path, config_warnings):
    path = write(tmp_path, "model:\n  arch: qwen_image\n")
    assert load_config(path).model.family == "qwen_image"
    assert config_warnings == [f"model.arch (from file {path}) is deprecated: it is read as model.family; rename it"]
    config_warnings.clear()
    # An override by the old name replaces the file's family, whichever name the file used.
    assert load_config(path, ["model.arch=wan"]).model.family == "wan"
    assert load_config(None, ["model={arch: qwen_image}"]).model.family == "qwen_image"
    assert len(config_warnings) == 3 and "command-line override 'model.arch=wan'" in config_warnings[1]
    with pytest.raises(ConfigError, match=r"model.arch: the deprecated name of model.family, given beside it"):
        load_config(write(tmp_path, "model:\n  arch: wan\n  family: wan\n", "both.yaml"))
    with pytest.raises(ConfigError, match=r"model.family: must be one of 'wan', 'qwen_image', got 'flux'"):
        load_config(None, ["model.arch=flux"])


def test_an_old_runs_config_with_model_arch_loads_and_is_compared_on_resume(tmp_path, config_warnings):
    from phased_dmd_mega.distill.trainer import check_resumable

    cfg = load_config(EXAMPLES / "tiny_cpu.yaml")
    old = dump_yaml(cfg).replace("\n  family: wan\n", "\n  arch: wan\n")
    assert "arch: wan" in old and "family" not in old
    folder = tmp_path / "iter_0000001"
    folder.mkdir()
    write(folder, old, "config.yaml")
    assert load_config(folder / "config.yaml") == cfg
    check_resumable(folder, cfg)  # the same run: resumes
    with pytest.raises(ConfigError, match=r"model.family \(checkpoint 'wan', now 'qwen_image'\)"):
        check_resumable(folder, load_config(EXAMPLES / "tiny_cpu.yaml", ["model.family=qwen_image"]))
    assert config_warnings and all("model.arch" in message for message in config_warnings)
