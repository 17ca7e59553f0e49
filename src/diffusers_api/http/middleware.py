"""ASGI middleware of the app: the request body limit."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import PayloadTooLarge
from .responses import error_response


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413, by header and by counting what actually arrives.

    The body is read here in full (it is bounded) and replayed to the app, so a chunked upload without a
    Content-Length is refused with the same clear error instead of failing somewhere inside body parsing.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return
        messages = await self._read_body(receive)
        if messages is None:
            await self._refuse(scope, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> list[Message] | None:
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return None
            if message["type"] != "http.request" or not message.get("more_body", False):
                return messages

    async def _refuse(self, scope: Scope, send: Send) -> None:
        error = PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes", limit=self.max_bytes)
        await error_response(scope["path"], error)(scope, receive=_no_receive, send=send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
