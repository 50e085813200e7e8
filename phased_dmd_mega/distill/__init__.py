"""Phased DMD distillation: roles, the phased rollout, the objectives and the training loop."""
