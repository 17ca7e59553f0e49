#!/bin/sh
# Build step: download the model named by the build args into the image (diffusers-api download reads MODEL_ID,
# HF_MODEL_ID, MODEL_REVISION, MODEL_VARIANT, MODEL_PRECISION, MODEL_URL, CHECKPOINT_URL from the environment).
# Secrets come from BuildKit secret mounts (files under SECRETS_DIR) and live only in this process's
# environment: they never reach an image layer or `docker history`.
set -eu

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

if [ -z "${MODEL_ID:-}" ]; then
  echo "bake-model: no MODEL_ID build arg: building an image without a baked-in model" >&2
  exit 0
fi
exec diffusers-api download "$@"
