"""Wire models: the native request and response, the job resource, and the legacy envelope adapter onto them.

- `request.py`: `GenerateRequest`, the one typed request that serves HTTP, the RunPod handler and the client;
- `response.py`: `GenerateResult` (what the runner returns) and `GenerateResponse`, the native answer;
- `jobs.py`: `JobStatus` and `JobProgress` of `/v1/jobs`;
- `legacy.py`: the docker-diffusers-api envelope, translated onto the request (`from_legacy`) and back (`to_legacy`);
- `upscale.py`: `UpscaleRequest` (POST /v1/upscale, legacy `use_extra: "upsample"`) and its answer;
- `train.py`: `TrainRequest` (`POST /v1/train`, legacy `callInputs.train`) and `TrainResult`.
"""

from .ip_adapter import IPAdapter
from .jobs import JobProgress, JobState, JobStatus
from .legacy import (
    decode_envelope,
    from_legacy,
    from_legacy_envelope,
    is_training,
    legacy_envelope_schema,
    to_legacy,
    to_legacy_training,
    train_from_legacy,
)
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
from .upscale import UpscaledImage, UpscaleRequest, UpscaleResponse, parse_upscale_request

# What the engine runs: a generation or an upscale.
AnyRequest = GenerateRequest | UpscaleRequest

__all__ = [
    "RESERVED_CALL_ARGS",
    "AnyRequest",
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
    "UpscaleRequest",
    "UpscaleResponse",
    "UpscaledImage",
    "decode_envelope",
    "describe_validation_error",
    "from_legacy",
    "from_legacy_envelope",
    "is_http_url",
    "is_training",
    "legacy_envelope_schema",
    "parse_request",
    "parse_upscale_request",
    "to_legacy",
    "to_legacy_training",
    "train_from_legacy",
]
