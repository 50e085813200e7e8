"""What several test modules share: tiny models and teachers, tiny runs, tiny text encoders,
Hugging Face folders, the Phased DMD set-up and the parity harness. Test modules import these,
never each other."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# The cluster recipes, examples/<name>.yaml (test_recipes and test_memory_estimate check each).
RECIPES = [
    "wan22_t2v_a14b",
    "wan22_i2v_a14b",
    "wan22_ti2v_5b",
    "wan21_t2v_14b",
    "wan21_t2v_1_3b",
    "wan21_14b_to_1_3b",
    "qwen_image",
]


def rel_error(a, b) -> float:
    """|a - b| / |b| over all elements."""
    return ((a - b).norm() / b.norm()).item()
