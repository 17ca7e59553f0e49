"""Logging set-up for the server processes: one line per record, library chatter turned down."""

from __future__ import annotations

import logging
import os
import sys

_QUIET = ("diffusers", "huggingface_hub", "httpx", "urllib3", "filelock")


def configure_logging(level: str = "info") -> None:
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


def _disable_progress_bars() -> None:
    """Loading progress bars help on a terminal and only litter a log file."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
