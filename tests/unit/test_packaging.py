"""Packaging: the kernels' import path, a regular (non-editable) install, and the Dockerfile."""

import ast
import importlib.util
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import phased_dmd_mega.kernels

from helpers import REPO_ROOT

ROOT = REPO_ROOT


def setup_py_value(name):
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no {name}")


def install_requires():
    return {Requirement(r).name: Requirement(r) for r in setup_py_value("INSTALL_REQUIRES")}


def image_requires():
    """What the Docker image must hold: install_requires and the `sample` extra (diffusers' VAEs)."""
    sample = {Requirement(r).name: Requirement(r) for r in setup_py_value("EXTRAS_REQUIRE")["sample"]}
    return {**install_requires(), **sample}


# The base image's own builds: never pinned in the Dockerfile (NGC's constraint file lists them).
IMAGE_OWN = {"torch", "triton", "numpy", "transformer-engine", "transformer_engine", "flash-attn", "flash_attn"}


def dockerfile_requirements(text):
    """The quoted requirement strings of the Dockerfile's pip install: pins (==) and ranges."""
    found = re.findall(r'"([A-Za-z0-9_.\-]+(?:==|>=|<=|~=|!=|<|>)[^"\s]*)"', text)
    return {Requirement(r).name: Requirement(r) for r in found}


def test_kernels_folder_is_the_package_phased_dmd_mega_kernels():
    assert Path(phased_dmd_mega.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_the_folder_is_not_importable_as_top_level_kernels(tmp_path):
    # The unrelated PyPI package `kernels` must stay free to import (transformers uses it).
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert str(ROOT / "kernels") not in out.stdout


@pytest.mark.slow
def test_regular_install_maps_kernels_into_the_package(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("phased_dmd_mega-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "phased_dmd_mega/kernels/__init__.py" in names
    assert not any(name.startswith("kernels/") for name in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import phased_dmd_mega.kernels as k; print(k.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(site / "phased_dmd_mega" / "kernels" / "__init__.py")


def test_dockerfile_is_pinned_and_consistent_with_setup_py():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), f"base image not pinned: {base}"
    requested = dockerfile_requirements(text)
    required = image_requires()
    # The base image provides torch and triton; everything else setup.py needs (and diffusers, for
    # the VAEs) is pinned here, or given setup.py's own range where the image may already have it.
    assert set(required) - {"torch", "triton"} <= set(requested), "Dockerfile misses a dependency of setup.py"
    for name, requirement in requested.items():
        assert name in required, f"Dockerfile installs {name}, which setup.py does not require"
        specs = list(requirement.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            assert name not in IMAGE_OWN, f"Dockerfile pins {name}, which the base image provides"
            assert required[name].specifier.contains(specs[0].version), (
                f"{name}=={specs[0].version} is outside setup.py's {required[name]}"
            )
        else:
            assert requirement.specifier == required[name].specifier, (
                f"Dockerfile gives {name} the range {requirement.specifier}, setup.py {required[name].specifier}"
            )
    assert "DS_BUILD_OPS=0" in text
    assert re.search(r"pip install --no-deps \.", text), "the package must not replace the image's torch"
    assert 'ENTRYPOINT ["phased-dmd"]' in text


def test_dockerfile_keeps_the_images_own_packages_and_checks_the_result():
    text = (ROOT / "Dockerfile").read_text()
    assert "-c /etc/pip/constraint.txt" in text, "NGC's constraint file must be used"
    assert not set(dockerfile_requirements(text)) & {"torch", "triton", "transformer-engine", "flash-attn"}
    assert "python tools/check_image.py" in text, "the build must check TE with megatron-core"


def test_check_image_accepts_this_environment_and_names_a_missing_transformer_engine():
    script = str(ROOT / "tools" / "check_image.py")
    out = subprocess.run([sys.executable, script, "--requirements-only"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "megatron-core 0.16.1" in out.stdout and "diffusers" in out.stdout
    if importlib.util.find_spec("transformer_engine") is not None:
        return
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "check_image.py: transformer_engine does not import (ModuleNotFoundError: No module named 'transformer_engine')"
    ]


def test_gpu_only_packages_are_optional():
    for name in install_requires():
        assert name not in {"transformer-engine", "transformer_engine", "flash-attn", "flash_attn", "apex"}
