#!/usr/bin/env bash
# Phased DMD distillation of Qwen-Image (examples/qwen_image.yaml) on one or more 8-GPU nodes.
#
#   QWEN_WEIGHTS=/data/Qwen-Image PROMPT_CACHE=/data/prompts/qwen OUTPUT=/data/runs/qwen_image \
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 examples/run_qwen_image.sh [--dry-run] [key.sub=value ...]
#
# Under SLURM (one task per node) NNODES, NODE_RANK, GPUS_PER_NODE and MASTER_ADDR come from
# SLURM's variables. All variables: examples/launch_common.sh. A relaunch resumes from
# $OUTPUT/checkpoints/latest.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPE_CONFIG="$here/qwen_image.yaml"
WEIGHTS_VAR=QWEN_WEIGHTS
# shellcheck source-path=SCRIPTDIR source=launch_common.sh
source "$here/launch_common.sh"
launch "$@"
