"""Logging set-up for the server processes: one line per record, library chatter turned down."""

from __future__ import annotations

import logging
import os
import re
import sys

_QUIET = ("diffusers", "huggingface_hub", "httpx", "urllib3", "filelock")


def configure_logging(level: str = "info") -> None:
    """Log lines to stderr. Imports no ML library: the server must answer health probes while those load."""
    # transformers warns at every start about optional backends (torchvision) that a server does not need. It
    # sets its own logger's level from this variable when it first logs, so a plain setLevel would not stick.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    if not sys.stderr.isatty():
        _disable_progress_bars()
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactTokens) for f in access.filters):
        access.addFilter(RedactTokens())


class RedactTokens(logging.Filter):
    """Access log lines show request paths: blank the value of a `token=` query parameter (a job's events
    token opens that job's stream and result), so that logs never hand out what they record."""

    PATTERN = re.compile(r"([?&]token=)[^&\s]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self.PATTERN.sub(r"\1<redacted>", arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


def _disable_progress_bars() -> None:
    """Loading progress bars help on a terminal and only litter a log file.

    Said through the environment rather than diffusers' and transformers' own switches, which would import
    them (and torch) here, seconds before the server could listen: diffusers draws plain tqdm bars, which obey
    TQDM_DISABLE; transformers and huggingface_hub read HF_HUB_DISABLE_PROGRESS_BARS when they are imported.
    Bars that a caller turns on or off explicitly (our own transfer bars, a pipeline's denoising bar) keep that
    choice."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
