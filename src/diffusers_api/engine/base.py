"""What every engine offers the transports: start, submit, health. The batching engine replaces the serial one
behind this same seam."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..runner import ProgressCallback
    from ..schema import GenerateRequest, GenerateResult


class Health(enum.StrEnum):
    STARTING = "STARTING"
    READY = "READY"
    BUSY = "BUSY"
    SETUP_FAILED = "SETUP_FAILED"
    DEFUNCT = "DEFUNCT"


class Engine(Protocol):
    """Runs requests on the device. Implementations must keep the event loop free."""

    @property
    def health(self) -> Health: ...

    @property
    def setup_error(self) -> str | None: ...

    @property
    def queue_depth(self) -> int: ...

    async def start(self) -> None:
        """Load the configured model; never raises (a failure sets SETUP_FAILED)."""

    async def stop(self) -> None: ...

    async def submit(self, request: GenerateRequest, progress: ProgressCallback | None = None) -> GenerateResult:
        """Queue a request and wait for its result. Cancelling the awaiting task cancels the request."""
        ...
