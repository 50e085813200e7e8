"""Packaging for phased-dmd-mega.

The Triton kernels live in the top-level ``kernels/`` folder but are imported as
``phased_dmd_mega.kernels``: an unrelated PyPI package called ``kernels`` exists (transformers
imports it when installed), so the folder is never put on ``sys.path`` under its own name.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "phased_dmd_mega" / "__init__.py").read_text()).group(1)

# Pinned ranges; the Dockerfile pins versions inside them (tests/unit/test_packaging.py checks).
INSTALL_REQUIRES = [
    "torch>=2.6,<2.14",
    "megatron-core>=0.16.1,<0.17",
    "triton>=3.3,<3.10",
    "deepspeed>=0.19.8,<0.20",
    "safetensors>=0.6,<0.9",
    "numpy>=1.26,<3",
    "pyyaml>=6.0,<7",
    "einops>=0.8,<0.9",
    # Progress bars on a terminal (phased_dmd_mega/progress.py).
    "tqdm>=4.66,<5",
    # Text encoders and tokenizers of `phased-dmd encode-prompts` (umT5, Qwen2.5-VL).
    "transformers>=5.23,<5.24",
]

EXTRAS_REQUIRE = {
    # Numerical references for the tests (diffusers' own models) and the test runner.
    "test": [
        "pytest>=8,<10",
        "diffusers>=0.42.1,<0.43",
        "accelerate>=1.10,<2",
        "matplotlib>=3.8,<4",
        "tensorboard>=2.16,<3",
        "peft>=0.21,<0.22",  # diffusers' load_lora_weights, for the LoRA export tests
        "ruff>=0.17,<0.18",  # lint and format check, run by `make test` before the tests
        "opencv-python-headless>=4.13,<5",  # `phased-dmd evaluate --flow farneback` (as the evaluate extra)
    ],
    # Decoding samples to frames (`phased-dmd sample --vae`, logging.sample_vae): diffusers' VAEs.
    "sample": ["diffusers>=0.42.1,<0.43"],
    # `phased-dmd evaluate`: Farneback optical flow (--flow farneback) and its plots. 4.13 and later
    # ask for numpy >= 2 only, so they keep the installed numpy; --flow raft:PATH needs torchvision,
    # which is not listed (install the build that matches your torch).
    "evaluate": ["opencv-python-headless>=4.13,<5", "matplotlib>=3.8,<4"],
    # TensorBoard scalars during training (logging.tensorboard_dir).
    "tensorboard": ["tensorboard>=2.16,<3"],
}

PACKAGES = find_packages(include=["phased_dmd_mega", "phased_dmd_mega.*"]) + ["phased_dmd_mega.kernels"]

setup(
    name="phased-dmd-mega",
    version=VERSION,
    description="Megatron-style Phased DMD distillation of Wan 2.x and Qwen-Image DiTs",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"phased_dmd_mega.kernels": "kernels"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["phased-dmd = phased_dmd_mega.cli:main"]},
)
