#!/bin/sh
# Prints how the image runs, for the entrypoint and the health check alike: MODE when it names a mode, and for
# MODE=auto (the default) runpod where RunPod's serverless job queue is present (RUNPOD_WEBHOOK_GET_JOB is set),
# http everywhere else.
set -eu

mode="${MODE:-auto}"
if [ "$mode" = auto ]; then
  if [ -n "${RUNPOD_WEBHOOK_GET_JOB:-}" ]; then mode=runpod; else mode=http; fi
fi
echo "$mode"
