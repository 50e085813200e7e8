#!/usr/bin/env python
"""Convert Wan and Qwen-Image weights between Hugging Face layouts and the trainer's format.

Same as ``phased-dmd convert ...``; runs from a checkout without installing the package:

    python tools/convert.py hf-to-mega --expect wan --src WAN_DIR --dst MEGA_DIR [--tp 8]
    python tools/convert.py mega-to-hf --expect wan --src MEGA_DIR --dst OUT_DIR --layout diffusers
    python tools/convert.py hf-to-mega --expect qwen_image --src QWEN_IMAGE_DIR --dst MEGA_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phased_dmd_mega.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["convert", *sys.argv[1:]]))
