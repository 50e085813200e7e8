# phased-dmd-mega for H100 clusters.
# The NGC PyTorch image brings CUDA, NCCL, cuDNN, PyTorch, Triton, Transformer Engine, flash-attn
# and NVIDIA apex built for each other; we add megatron-core, DeepSpeed, diffusers and this package.
#
# NGC 25.10: CUDA 13.0, PyTorch 2.9.0a0+145a3a7bda, and, as a build of this base image reports
# (NVIDIA's 25.10 release notes were not at hand to confirm it), Transformer Engine 2.8.0,
# flash-attn 2.7.4 and numpy 2.1. megatron-core 0.16.1 works with TE 2.8: it imports TE through
# megatron.core.extensions.transformer_engine and asks for 2.8, 2.9 or 2.10 only for softmax_type,
# qk-clip and num_splits, none of which this project uses (its own "dev" extra pins
# TE >=2.9.0a0,<2.12, so 2.8 is below what megatron-core tests). The check at the end of the
# build prints the TE version and imports megatron-core with it: an incompatible pair fails there.
FROM nvcr.io/nvidia/pytorch:25.10-py3

# 0 for a build on a machine without a GPU whose TE cannot import without the driver
# (then run `python tools/check_image.py` in a container with GPUs).
ARG CHECK_TE=1

ENV DS_BUILD_OPS=0 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# NGC lists the versions of its own packages (torch, TE, flash-attn, numpy, ...) in
# /etc/pip/constraint.txt (its PIP_CONSTRAINT); used explicitly, so nothing here replaces them
# (a conflict fails the build instead). What the image may already have gets setup.py's range,
# not a pin: the image's version stays when inside it. The rest is pinned inside setup.py's
# ranges. tests/unit/test_packaging.py checks both against setup.py.
RUN if [ -f /etc/pip/constraint.txt ]; then set -- -c /etc/pip/constraint.txt; fi; \
    pip install "$@" \
        "megatron-core==0.16.1" \
        "deepspeed==0.19.8" \
        "diffusers==0.42.1" \
        "transformers==5.23.0" \
        "safetensors>=0.6,<0.9" \
        "numpy>=1.26,<3" \
        "pyyaml>=6.0,<7" \
        "einops>=0.8,<0.9" \
        "tqdm>=4.66,<5"

WORKDIR /opt/phased-dmd-mega
COPY . .
# --no-deps keeps the image's own torch, triton, TE and flash-attn builds untouched. Then every
# requirement's version against setup.py, and TE with megatron-core (tools/check_image.py).
RUN pip install --no-deps . && phased-dmd --help > /dev/null \
    && if [ "$CHECK_TE" = 1 ]; then python tools/check_image.py; else python tools/check_image.py --requirements-only; fi

ENTRYPOINT ["phased-dmd"]
CMD ["--help"]
