"""A real HTTP receiver on loopback, in a thread: records every POST (webhooks, RunPod progress posts).

`hang=True` makes it accept connections and never answer until it is closed, like a stuck webhook endpoint;
`redirect_to` makes it answer every POST with a 302 to that location. Any other method is recorded and refused.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: bytes
    method: str = "POST"

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    url: str
    posts: list[Post] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)

    def wait_for(self, predicate: Any, timeout: float = 30) -> list[Post]:
        """Wait until `predicate(posts)` holds; returns the posts (the test asserts on them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate(list(self.posts)):
            time.sleep(0.02)
        return list(self.posts)


@contextmanager
def receiver(hang: bool = False, redirect_to: str | None = None) -> Iterator[Receiver]:
    recorder: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            body = self.rfile.read(length)
            recorder.posts.append(Post(self.path, dict(self.headers.items()), body))
            if hang:
                recorder.released.wait(60)
                return
            self.send_response(302 if redirect_to else 200)
            if redirect_to:
                self.send_header("location", redirect_to)
            self.send_header("content-length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            recorder.posts.append(Post(self.path, dict(self.headers.items()), b"", method="GET"))
            self.send_error(405)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    recorder = Receiver(f"http://127.0.0.1:{server.server_address[1]}/hook")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        recorder.released.set()
        server.shutdown()
        server.server_close()
