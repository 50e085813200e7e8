"""The Transformer Engine layer spec, checked on CPU against megatron-core's own TE wrappers.

TE cannot be imported here (and must never be installed on a CPU machine), but megatron-core's
wrappers around it are installed source: their constructor signatures and the config fields they
read are parsed from that file, and every parallel linear the models build (recorded while the
real Wan and Qwen-Image models are built with the local layers, which take the same arguments)
must bind to them."""

import ast
import inspect
from dataclasses import replace
from pathlib import Path

import megatron.core
import pytest
import torch

from phased_dmd_mega import parallel
from phased_dmd_mega.models import QWEN_IMAGE_PRESETS, ModelParallelOptions, QwenImageModel, WanModel, layers
from phased_dmd_mega.models.wan import WAN_PRESETS
from phased_dmd_mega.parallel import linears

MEGATRON_TE = Path(megatron.core.__file__).parent / "extensions" / "transformer_engine.py"
WRAPPERS = {"column": "TEColumnParallelLinear", "row": "TERowParallelLinear"}
_DEFAULT = object()


@pytest.fixture(scope="module")
def te_source():
    return ast.parse(MEGATRON_TE.read_text())


@pytest.fixture
def single_process():
    parallel.initialize()
    yield
    parallel.destroy()


def _top_level(tree, name):
    return next(node for node in tree.body if getattr(node, "name", None) == name)


def _init_signature(class_node) -> inspect.Signature:
    """The __init__ signature of a class as written in the source, without ``self``."""
    init = next(node for node in class_node.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    args = init.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [
        inspect.Parameter(
            a.arg,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=_DEFAULT if d is not None else inspect.Parameter.empty,
        )
        for a, d in zip(positional, defaults)
    ][1:]
    if args.vararg:
        params.append(inspect.Parameter(args.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    params += [
        inspect.Parameter(
            a.arg, inspect.Parameter.KEYWORD_ONLY, default=_DEFAULT if d is not None else inspect.Parameter.empty
        )
        for a, d in zip(args.kwonlyargs, args.kw_defaults)
    ]
    if args.kwarg:
        params.append(inspect.Parameter(args.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params)


def _config_fields_read(tree) -> set:
    """``config.X`` and ``self.config.X`` read by the TE linear wrappers and the helpers they call."""
    names = (
        "TELinear",
        "TEColumnParallelLinear",
        "TERowParallelLinear",
        "_get_extra_te_kwargs",
        "condition_init_method",
    )
    fields = set()
    for node in (n for name in names for n in ast.walk(_top_level(tree, name))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute)):
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id == "config") or (
                isinstance(owner, ast.Attribute)
                and owner.attr == "config"
                and isinstance(owner.value, ast.Name)
                and owner.value.id == "self"
            ):
                fields.add(node.attr)
    return fields


def _recorded_linears(monkeypatch, build):
    """Every (kind, args, kwargs) a model's constructor passes to its parallel linears."""
    from megatron.core.tensor_parallel import ColumnParallelLinear as column
    from megatron.core.tensor_parallel import RowParallelLinear as row

    calls = []

    class RecordedColumn(column):
        def __init__(self, *args, **kwargs):
            calls.append(("column", args, kwargs))
            super().__init__(*args, **kwargs)

    class RecordedRow(row):
        def __init__(self, *args, **kwargs):
            calls.append(("row", args, kwargs))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(layers, "linear_spec", lambda impl="local": layers.LinearSpec(RecordedColumn, RecordedRow))
    build()
    return calls


MODELS = {
    "wan": lambda: WanModel(WAN_PRESETS["tiny"], ModelParallelOptions(sequence_parallel=True)),
    "wan_i2v": lambda: WanModel(replace(WAN_PRESETS["tiny"], image_dim=32, in_channels=36), ModelParallelOptions()),
    "qwen_image": lambda: QwenImageModel(QWEN_IMAGE_PRESETS["tiny"], ModelParallelOptions()),
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_parallel_linear_binds_to_megatrons_te_wrappers(single_process, monkeypatch, te_source, model):
    calls = _recorded_linears(monkeypatch, MODELS[model])
    assert {kind for kind, _, _ in calls} == {"column", "row"}
    signatures = {kind: _init_signature(_top_level(te_source, name)) for kind, name in WRAPPERS.items()}
    for kind, args, kwargs in calls:
        signatures[kind].bind(*args, **kwargs)  # TypeError names a missing or unknown argument


@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_config_has_every_field_the_te_wrappers_read(single_process, monkeypatch, te_source, model):
    fields = _config_fields_read(te_source)
    assert {"disable_parameter_transpose_cache", "symmetric_ar_type", "sequence_parallel"} <= fields
    for _, _, kwargs in _recorded_linears(monkeypatch, MODELS[model]):
        config = kwargs["config"]
        missing = sorted(f for f in fields if not hasattr(config, f))
        assert not missing, f"{type(config).__name__} lacks {missing}"
        # TE's cached FP8 weight cast would outlive the optimizer's updates (see model_parallel_config).
        assert config.disable_parameter_transpose_cache is True


def test_the_spec_arguments_bind_to_the_local_layers_too(single_process):
    column, row = linears.local_linear_classes()
    config = layers.model_parallel_config(False, torch.float32, True)
    inspect.signature(column).bind(8, 16, **layers.column_parallel_kwargs(config, torch.nn.init.zeros_))
    inspect.signature(row).bind(16, 8, **layers.row_parallel_kwargs(config, torch.nn.init.zeros_))
