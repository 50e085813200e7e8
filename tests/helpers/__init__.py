"""What several test modules share: tiny models and teachers, tiny runs, tiny text encoders,
Hugging Face folders, the Phased DMD set-up and the parity harness. Test modules import these,
never each other."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def rel_error(a, b) -> float:
    """|a - b| / |b| over all elements."""
    return ((a - b).norm() / b.norm()).item()
