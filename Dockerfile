# syntax=docker/dockerfile:1.7
# diffusers-api with one model baked in, for fast cold starts. One image runs either the RunPod serverless
# worker or the HTTP server (MODE=runpod|http|auto, see docker/entrypoint.sh).
#
#   DOCKER_BUILDKIT=1 docker build -t diffusers-api:sd21 \
#     --build-arg MODEL_ID=stabilityai/stable-diffusion-2-1-base --build-arg MODEL_PRECISION=fp16 \
#     --build-arg MODEL_VARIANT=fp16 --secret id=hf_token,env=HF_TOKEN .
#
# Secrets (hf_token, aws_access_key_id, aws_secret_access_key) are BuildKit secrets: mounted for the one step
# that downloads the model, never written to a layer. Do not pass them as --build-arg.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from PyTorch's CUDA index, so that installing the package does not pull another build.
ARG TORCH=torch==2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install .
# Cold start: bytecode for everything installed, written now rather than by every fresh container on its first
# import (importing torch and diffusers from source takes 2-3x as long as from bytecode). pip compiles what it
# installs by default; this makes sure of it whatever installed a file. A few files are not valid for this
# Python (torch ships tests written for newer syntax): they cannot be imported either, so they are not fatal.
RUN python -m compileall -q -j 0 /opt/venv/lib > /dev/null \
    || echo "compileall: a few files are not valid Python $(python3 -V); everything else is compiled"
COPY docker/entrypoint.sh docker/bake-model.sh /app/docker/

# The model: build args become the runtime defaults too, so the server serves what was baked in.
ARG MODEL_ID=""
ARG HF_MODEL_ID=""
ARG MODEL_REVISION=""
ARG MODEL_VARIANT=""
ARG MODEL_PRECISION=""
ARG MODEL_URL=""
ARG CHECKPOINT_URL=""
# Empty MODELS_DIR (--build-arg MODELS_DIR=) falls back to /runpod-volume/diffusers-api when a network volume is
# attached, else ~/.cache/diffusers-api.
ARG MODELS_DIR=/models
ENV MODEL_ID=${MODEL_ID} \
    HF_MODEL_ID=${HF_MODEL_ID} \
    MODEL_REVISION=${MODEL_REVISION} \
    MODEL_VARIANT=${MODEL_VARIANT} \
    MODEL_PRECISION=${MODEL_PRECISION} \
    MODEL_URL=${MODEL_URL} \
    CHECKPOINT_URL=${CHECKPOINT_URL} \
    MODELS_DIR=${MODELS_DIR} \
    RUNPOD_LOG_LEVEL=INFO
RUN --mount=type=secret,id=hf_token \
    --mount=type=secret,id=aws_access_key_id \
    --mount=type=secret,id=aws_secret_access_key \
    /app/docker/bake-model.sh

ENV MODE=auto \
    PORT=8000
EXPOSE 8000
ENTRYPOINT ["/app/docker/entrypoint.sh"]
