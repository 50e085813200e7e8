"""Packaging: the kernels' import path, a regular (non-editable) install, and the Dockerfile."""

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import phased_dmd_mega.kernels

ROOT = Path(__file__).resolve().parents[1]


def install_requires():
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "INSTALL_REQUIRES":
            return {Requirement(r).name: Requirement(r) for r in ast.literal_eval(node.value)}
    raise AssertionError("setup.py has no INSTALL_REQUIRES")


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
        capture_output=True, text=True, timeout=600,
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
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(site / "phased_dmd_mega" / "kernels" / "__init__.py")


def test_dockerfile_is_pinned_and_consistent_with_setup_py():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), f"base image not pinned: {base}"
    pins = {Requirement(p).name: Requirement(p) for p in re.findall(r'"([A-Za-z0-9_.\-]+==[^"]+)"', text)}
    required = install_requires()
    # The base image provides torch and triton; everything else setup.py needs is pinned here.
    assert set(required) - {"torch", "triton"} <= set(pins), "Dockerfile misses a dependency of setup.py"
    for name, pin in pins.items():
        version = next(iter(pin.specifier)).version
        assert name in required, f"Dockerfile pins {name}, which setup.py does not require"
        assert required[name].specifier.contains(version), f"{name}=={version} is outside setup.py's {required[name]}"
    assert "DS_BUILD_OPS=0" in text
    assert re.search(r"pip install --no-deps \.", text), "the package must not replace the image's torch"
    assert 'ENTRYPOINT ["phased-dmd"]' in text


def test_gpu_only_packages_are_optional():
    for name in install_requires():
        assert name not in {"transformer-engine", "transformer_engine", "flash-attn", "flash_attn", "apex"}
