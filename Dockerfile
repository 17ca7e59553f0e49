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
#
# Layers, from the least to the most often changed: the Python packages (requirements.lock, exact versions and
# hashes), the model, the code. Downloading the model takes the code (`diffusers-api download`), so it happens
# in a stage of its own, into a BuildKit cache: after a code or README edit that stage finds the model in the
# cache instead of downloading it again, and the final image copies the same bytes into the same, still cached,
# layer, which a push or a pull then skips.
#
# The base is plain Python: torch's wheels carry the CUDA libraries they use (cuBLAS, cuDNN, NCCL, ...) and the
# NVIDIA container runtime mounts the driver, so an nvidia/cuda base would only hold a second copy of those
# libraries. The lock's torch (2.11.0 from PyPI) is built for CUDA 13.0: it needs an NVIDIA driver 580 or newer
# and a Turing (sm_75) or newer GPU (docs/runpod.md).

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS deps
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# tini is the init process: PID 1 that passes signals on (docker stop, RunPod scaling down) and reaps
# zombies. Debian stable's packages only change for security fixes, which a version pin would refuse.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-deps --require-hashes --requirement /tmp/requirements.lock
# Cold start: bytecode for everything installed, written now rather than by every fresh container on its first
# import (importing torch and diffusers from source takes 2-3x as long as from bytecode). pip compiles what it
# installs by default; this makes sure of it whatever installed a file. A few files are not valid for this
# Python (torch ships tests written for newer syntax): they cannot be imported either, so they are not fatal.
RUN python -m compileall -q -j 0 /opt/venv/lib > /dev/null \
    || echo "compileall: a few files are not valid Python $(python -V); everything else is compiled"

# --- the model: downloaded with the code, kept in a build cache --------------------------------------------------
FROM deps AS model
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps .
COPY docker/bake-model.sh /app/docker/
ARG MODEL_ID=""
ARG HF_MODEL_ID=""
ARG MODEL_REVISION=""
ARG MODEL_VARIANT=""
ARG MODEL_PRECISION=""
ARG MODEL_URL=""
ARG CHECKPOINT_URL=""
ARG MODELS_DIR=/models
ENV MODEL_ID=${MODEL_ID} \
    HF_MODEL_ID=${HF_MODEL_ID} \
    MODEL_REVISION=${MODEL_REVISION} \
    MODEL_VARIANT=${MODEL_VARIANT} \
    MODEL_PRECISION=${MODEL_PRECISION} \
    MODEL_URL=${MODEL_URL} \
    CHECKPOINT_URL=${CHECKPOINT_URL} \
    MODELS_DIR=${MODELS_DIR}
# The cache is locked while in use: two builds of one model at once would write the same entry.
RUN --mount=type=secret,id=hf_token \
    --mount=type=secret,id=aws_access_key_id \
    --mount=type=secret,id=aws_secret_access_key \
    --mount=type=cache,id=diffusers-api-models,target=/cache,sharing=locked \
    BAKE_CACHE=/cache /app/docker/bake-model.sh /baked

# --- the image ---------------------------------------------------------------------------------------------------
FROM deps
# A user of its own: the code and the packages stay root's, read-only to the server; the model store is its.
# RunPod's network volumes belong to root: an image that keeps its models on one (built without MODEL_ID, or
# with RUNTIME_DOWNLOADS) needs --build-arg APP_UID=0, which runs it as root.
ARG APP_UID=1000
RUN if [ "${APP_UID}" != 0 ]; then \
        groupadd --gid "${APP_UID}" app \
        && useradd --no-log-init --create-home --uid "${APP_UID}" --gid "${APP_UID}" app; \
    fi

# The model, before the code. The build args become the runtime defaults too, so the server serves what was
# baked in, and a baked image runs OFFLINE (no network call at start; -e OFFLINE=0 with RUNTIME_DOWNLOADS=1).
# Empty MODELS_DIR (--build-arg MODELS_DIR=, only without MODEL_ID) falls back to /runpod-volume/diffusers-api
# when a network volume is attached, else ~/.cache/diffusers-api.
ARG MODEL_ID=""
ARG HF_MODEL_ID=""
ARG MODEL_REVISION=""
ARG MODEL_VARIANT=""
ARG MODEL_PRECISION=""
ARG MODEL_URL=""
ARG CHECKPOINT_URL=""
ARG MODELS_DIR=/models
COPY --from=model --chown=${APP_UID}:${APP_UID} /baked ${MODELS_DIR:-/models}
ENV MODEL_ID=${MODEL_ID} \
    HF_MODEL_ID=${HF_MODEL_ID} \
    MODEL_REVISION=${MODEL_REVISION} \
    MODEL_VARIANT=${MODEL_VARIANT} \
    MODEL_PRECISION=${MODEL_PRECISION} \
    MODEL_URL=${MODEL_URL} \
    CHECKPOINT_URL=${CHECKPOINT_URL} \
    MODELS_DIR=${MODELS_DIR} \
    OFFLINE=${MODEL_ID:+1}

# The code, last: an edit rebuilds only these layers.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps .
COPY docker/entrypoint.sh docker/mode.sh docker/healthcheck.sh /app/docker/

USER ${APP_UID}
ENV MODE=auto \
    PORT=8000
EXPOSE 8000
# /ping answers 200 once the model is loaded; a start may take minutes for a large model on a slow disk.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 CMD ["/app/docker/healthcheck.sh"]
ENTRYPOINT ["/usr/bin/tini", "--", "/app/docker/entrypoint.sh"]
