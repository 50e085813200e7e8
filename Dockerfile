# phased-dmd-mega for H100 clusters.
# The NGC PyTorch image brings CUDA, NCCL, cuDNN, PyTorch, Triton, Transformer Engine, flash-attn
# and NVIDIA apex built for each other; we add megatron-core, DeepSpeed and this package.
FROM nvcr.io/nvidia/pytorch:25.10-py3

ENV DS_BUILD_OPS=0 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# Versions pinned inside setup.py's ranges (tests/test_packaging.py checks this).
RUN pip install \
        "megatron-core==0.16.1" \
        "deepspeed==0.19.8" \
        "safetensors==0.8.0" \
        "numpy==1.26.4" \
        "pyyaml==6.0.2" \
        "einops==0.8.1" \
        "transformers==5.23.0"

WORKDIR /opt/phased-dmd-mega
COPY . .
# --no-deps keeps the image's own torch, triton, TE and flash-attn builds untouched.
RUN pip install --no-deps . && phased-dmd --help > /dev/null

ENTRYPOINT ["phased-dmd"]
CMD ["--help"]
