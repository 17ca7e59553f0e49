"""The Python client: named test requests, sent to a server (`POST /`, or as jobs: `POST /v1/jobs`, then
`GET /v1/jobs/{id}` until the job ends) or to a RunPod endpoint (`/run`, then `/status/{id}` until the job
ends), with the images saved to a folder. `diffusers-api client` is its CLI; the end-to-end tests use it too.
`verify_webhook` checks the signature of a webhook this server sent.

    from diffusers_api.client import Client, build_test
    response = Client("http://localhost:8000/").send(build_test("txt2img"))

- `named.py`: the named tests and the `K=V` overrides; `transports.py`: where a request goes (`Client`,
  `JobsClient`, `RunPodClient`); `command.py`: the command (`run_tests`) and `verify_webhook`.
"""

from .base import TERMINAL_STATES, ClientError, ClientSettings, Envelope
from .command import run_tests, save_images, verify_webhook
from .named import TESTS, build_test, coerce, parse_pairs
from .transports import Client, JobsClient, Reply, RunPodClient

__all__ = [
    "TERMINAL_STATES",
    "TESTS",
    "Client",
    "ClientError",
    "ClientSettings",
    "Envelope",
    "JobsClient",
    "Reply",
    "RunPodClient",
    "build_test",
    "coerce",
    "parse_pairs",
    "run_tests",
    "save_images",
    "verify_webhook",
]
