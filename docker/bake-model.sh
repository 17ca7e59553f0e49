#!/bin/sh
# Build step: bake-model.sh DEST downloads the model named by the build args into DEST, the directory the
# image keeps as MODELS_DIR (diffusers-api download reads MODEL_ID, HF_MODEL_ID, MODEL_REVISION, MODEL_VARIANT,
# MODEL_PRECISION, MODEL_URL, CHECKPOINT_URL from the environment).
#
# With BAKE_CACHE (a BuildKit cache mount) the download goes there first, into a directory named after those
# settings, and is then copied into DEST: when a code edit rebuilds this step, the model is found in the cache
# instead of being downloaded again, and DEST gets the same bytes (so the image's model layer stays cached).
#
# Secrets come from BuildKit secret mounts (files under SECRETS_DIR) and live only in this process's
# environment: they never reach an image layer or `docker history`.
set -eu

dest="${1:?usage: bake-model.sh DEST}"
mkdir -p "$dest"
if [ -z "${MODEL_ID:-}" ]; then
  echo "bake-model: no MODEL_ID build arg: building an image without a baked-in model" >&2
  exit 0
fi
if [ -z "${MODELS_DIR:-}" ]; then
  echo "bake-model: MODEL_ID needs a MODELS_DIR build arg: with none the server would not look where the model is baked" >&2
  exit 64
fi

secrets="${SECRETS_DIR:-/run/secrets}"
read_secret() {  # read_secret <file> <VARIABLE>: export VARIABLE from the secret file when it was mounted
  if [ -s "$secrets/$1" ]; then
    value="$(cat "$secrets/$1")"
    export "$2=$value"
  fi
}
read_secret hf_token HF_TOKEN
read_secret aws_access_key_id AWS_ACCESS_KEY_ID
read_secret aws_secret_access_key AWS_SECRET_ACCESS_KEY

if [ -z "${BAKE_CACHE:-}" ]; then
  MODELS_DIR="$dest" exec diffusers-api download
fi
settings="MODEL_ID=$MODEL_ID HF_MODEL_ID=${HF_MODEL_ID:-} MODEL_REVISION=${MODEL_REVISION:-} MODEL_VARIANT=${MODEL_VARIANT:-}"
settings="$settings MODEL_PRECISION=${MODEL_PRECISION:-} MODEL_URL=${MODEL_URL:-} CHECKPOINT_URL=${CHECKPOINT_URL:-}"
cached="$BAKE_CACHE/$(printf '%s' "$settings" | sha256sum | cut -c1-16)"
MODELS_DIR="$cached" diffusers-api download
cp -a "$cached/." "$dest/"
