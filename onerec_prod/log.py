"""Logging set-up shared by the CLI, jobs and tasks (one line per event, rank 0 only)."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root logger once: time, level, logger name, message; rank>0 quiet."""
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank > 0:
        level = "WARNING"
    root = logging.getLogger()
    if getattr(root, "_onerec_configured", False):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("py4j", "urllib3", "httpx", "alembic", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root._onerec_configured = True  # type: ignore[attr-defined]
