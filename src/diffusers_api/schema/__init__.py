"""Wire models: the native request and response, the job resource, and the legacy envelope adapter onto them.

- `request.py`: `GenerateRequest`, the one typed request that serves HTTP, the RunPod handler and the client;
- `response.py`: `GenerateResult` (what the runner returns) and `GenerateResponse`, the native answer;
- `jobs.py`: `JobStatus` and `JobProgress` of `/v1/jobs`;
- `legacy.py`: the docker-diffusers-api envelope, translated onto the request (`from_legacy`) and back (`to_legacy`).
"""

from .ip_adapter import IPAdapter
from .jobs import JobProgress, JobState, JobStatus
from .legacy import decode_envelope, from_legacy, legacy_envelope_schema, to_legacy
from .request import (
    RESERVED_CALL_ARGS,
    GenerateRequest,
    ImageFormat,
    LoraWeight,
    TextualInversion,
    describe_validation_error,
    is_http_url,
    parse_request,
)
from .response import ErrorBody, ErrorResponse, GenerateResponse, GenerateResult, ImageOut

__all__ = [
    "RESERVED_CALL_ARGS",
    "ErrorBody",
    "ErrorResponse",
    "GenerateRequest",
    "GenerateResponse",
    "GenerateResult",
    "IPAdapter",
    "ImageFormat",
    "ImageOut",
    "JobProgress",
    "JobState",
    "JobStatus",
    "LoraWeight",
    "TextualInversion",
    "decode_envelope",
    "describe_validation_error",
    "from_legacy",
    "is_http_url",
    "legacy_envelope_schema",
    "parse_request",
    "to_legacy",
]
