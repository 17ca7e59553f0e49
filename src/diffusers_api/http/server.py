"""`diffusers-api serve`: the app under uvicorn, with a drain at SIGTERM (or Ctrl-C) and an exit when the model
cannot load.

The drain, before uvicorn's own shutdown:

1. stop taking work: the listening sockets close, idle keep-alive connections close, busy ones close after their
   answer (as uvicorn does);
2. let the work in flight finish, for DRAIN_TIMEOUT_S at most: requests being answered (`POST /`,
   `/v1/generate`, NDJSON streams) and jobs, queued or running;
3. cancel the rest: each request stops at its next denoising step and answers CANCELLED; each job ends
   CANCELLED, so its webhook gets its last event and its open event streams their final status, then close;
4. uvicorn's shutdown and the app's lifespan: the engine stops and the webhooks still queued are delivered
   (http/app.py), and the process exits.

Without a drain, uvicorn waits for every open connection, so an event stream kept a shutdown waiting for its
job whatever its length, and jobs nobody watched were cut off at once, their webhooks lost with the process.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import uvicorn

from .app import create_app

if TYPE_CHECKING:
    from ..config import Settings
    from .deps import Services

log = logging.getLogger(__name__)

# After the drain: how long the cancelled requests get to reach their next step and answer, and how long uvicorn
# then waits for connections to finish writing (an event stream's final status) before it cuts them.
CANCEL_WAIT_S = 10.0
CLOSE_WAIT_S = 5.0


def serve(settings: Settings) -> int:
    """Run the HTTP server until SIGTERM or Ctrl-C (0), or until the model fails to load (1, the reason on
    stderr: a supervisor restarts or alerts, where a server answering SETUP_FAILED would sit there forever)."""
    failures: list[str] = []

    def setup_failed(reason: str) -> None:
        failures.append(reason)
        server.should_exit = True

    app = create_app(settings, on_setup_failed=setup_failed)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,
        timeout_graceful_shutdown=int(CLOSE_WAIT_S),
    )
    server = DrainingServer(config, app.state.services, settings.drain_timeout_s)
    server.run()
    if failures:
        print(f"diffusers-api: the model could not be loaded, so the server stopped: {failures[0]}", file=sys.stderr)
        return 1
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose shutdown drains the app's work first (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, services: Services, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.services = services
        self.drain_timeout_s = drain_timeout_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._stop_taking(sockets)
        await self._drain()
        await super().shutdown(sockets)

    def _stop_taking(self, sockets: list[socket.socket] | None) -> None:
        """What uvicorn's shutdown starts with; it does it again, harmlessly."""
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()

    async def _drain(self) -> None:
        jobs, in_flight = self.services.jobs, self.services.in_flight
        if not (jobs.unfinished or in_flight.generations):
            return
        log.info(
            "draining: %d jobs and %d requests have up to %s s (DRAIN_TIMEOUT_S) to finish",
            jobs.unfinished,
            len(in_flight.generations),
            self.drain_timeout_s,
        )
        await self._wait(lambda: bool(jobs.unfinished or in_flight.generations), self.drain_timeout_s)
        requests = in_flight.cancel_all()
        cancelled = await jobs.cancel_unfinished()
        if requests or cancelled:
            log.warning("drained: cancelled %d jobs and %d requests still running after the grace", cancelled, requests)
            await self._wait(lambda: bool(in_flight.generations), CANCEL_WAIT_S)

    async def _wait(self, busy: Callable[[], bool], timeout_s: float) -> None:
        """Until `busy()` is false, `timeout_s` passes, or a second Ctrl-C forces the exit."""
        deadline = time.monotonic() + timeout_s
        while busy() and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
