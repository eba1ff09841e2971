"""Per-request deadlines of the serving backends (a leaf module: every backend imports it).

A deadline is a ``time.monotonic()`` value. It is checked once a call holds the model, so a request
that waited in the queue past its deadline is dropped instead of computed for nobody.
"""

from __future__ import annotations

import time


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its generation started; the work is dropped."""


def check_deadline(deadline: float | None) -> None:
    """Raise :class:`DeadlineExceeded` when ``deadline`` (monotonic seconds) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("request deadline passed before generation started")
