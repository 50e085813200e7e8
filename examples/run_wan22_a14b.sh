#!/usr/bin/env bash
# Phased DMD distillation of Wan2.2-T2V-A14B (examples/wan22_t2v_a14b.yaml) on one or more
# 8-GPU nodes; other Wan recipes through CONFIG (wan22_i2v_a14b, wan21_t2v_14b, wan21_t2v_1_3b).
#
#   WAN_WEIGHTS=/data/Wan2.2-T2V-A14B-Diffusers PROMPT_CACHE=/data/prompts/wan OUTPUT=/data/runs/wan22 \
#   NNODES=32 NODE_RANK=0 MASTER_ADDR=node001 examples/run_wan22_a14b.sh [--dry-run] [key.sub=value ...]
#
# Under SLURM (one task per node) NNODES, NODE_RANK, GPUS_PER_NODE and MASTER_ADDR come from
# SLURM's variables. All variables: examples/launch_common.sh. A relaunch resumes from
# $OUTPUT/checkpoints/latest.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPE_CONFIG="$here/wan22_t2v_a14b.yaml"
WEIGHTS_VAR=WAN_WEIGHTS
# shellcheck source-path=SCRIPTDIR source=launch_common.sh
source "$here/launch_common.sh"
launch "$@"
