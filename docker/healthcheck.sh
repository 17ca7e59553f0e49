#!/bin/sh
# The image's HEALTHCHECK. The HTTP server is healthy once GET /ping answers 200: the model is loaded and
# requests are served (204 while it loads, 503 when loading failed). The RunPod queue worker listens on no port
# and RunPod follows it through the worker's own heartbeat, so there is nothing here to ask: healthy while it
# runs.
set -eu

mode="$("$(dirname "$0")/mode.sh")"
case "$mode" in
  runpod) exit 0 ;;
  http | serve) ;;
  *)
    echo "healthcheck: MODE must be runpod, http or auto, not '$mode'"
    exit 1
    ;;
esac
exec python - "http://127.0.0.1:${PORT:-8000}/ping" <<'PYTHON'
import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
        status = response.status
except OSError as exc:  # refused, timed out, or an HTTP error status (503: the model failed to load)
    sys.exit(f"{sys.argv[1]}: {exc}")
print(f"{sys.argv[1]}: {status}")
sys.exit(0 if status == 200 else 1)
PYTHON
