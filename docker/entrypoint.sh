#!/bin/sh
# The image's entrypoint: one image, two ways to run it. Arguments are passed on to the command.
#   MODE=runpod  the RunPod serverless worker (diffusers-api runpod): queue endpoints
#   MODE=http    the HTTP server (diffusers-api serve): pods, load-balancing endpoints, any Docker host
#   MODE=auto    (default) runpod where RunPod's serverless job queue is present (RUNPOD_WEBHOOK_GET_JOB is
#                set), http everywhere else (docker/mode.sh)
set -eu

mode="$("$(dirname "$0")/mode.sh")"
case "$mode" in
  runpod) exec diffusers-api runpod "$@" ;;
  http | serve) exec diffusers-api serve "$@" ;;
  *)
    echo "entrypoint: MODE must be runpod, http or auto, not '$mode'" >&2
    exit 64
    ;;
esac
