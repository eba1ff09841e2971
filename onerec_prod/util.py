"""Small shared helpers: atomic file writes, day validation, the model meta file.

Why one module: these three were written by hand in many places (temp file then rename, three
date checks, three readers of ``onerec_meta.json``), each slightly different. A reader must never
see a half-written file, a day must be a real calendar date, and the meta file has one name and
one reading. Standard library only, so any module (CLI, DAG, Spark job, serving) can import it
without pulling torch or Spark.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import IO, Any

META_FILE = "onerec_meta.json"


# --------------------------------------------------------------------------------------
# atomic writes


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed onto ``path`` when the block succeeds.

    The temp name is hidden (``.<name>.tmp-<pid>-<rand><suffix>``) and unique per writer, so two
    writers never share one; on an error it is removed and ``path`` is left as it was. ``suffix``
    is for writers that append an extension themselves (``np.savez`` adds ``.npz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` whose content appears at ``path`` only once the block succeeds."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files: mode must start with 'w', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (temp file, then rename); return ``path``."""
    with atomic_open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, **dumps_kwargs: Any) -> Path:
    """``atomic_write_text`` of ``json.dumps(obj, **dumps_kwargs)`` (defaults: indent 2, sorted keys)."""
    kw = {"indent": 2, "sort_keys": True, **dumps_kwargs}
    return atomic_write_text(path, json.dumps(obj, **kw))


# --------------------------------------------------------------------------------------
# days


def check_date(dt: str, what: str = "--date") -> str:
    """``dt`` if it is a real ``YYYY-MM-DD`` calendar day, else ValueError naming ``what``.

    >>> check_date("2014-01-31")
    '2014-01-31'
    >>> check_date("2014-02-30", "dt")
    Traceback (most recent call last):
    ...
    ValueError: dt '2014-02-30': expected YYYY-MM-DD
    """
    try:
        if date.fromisoformat(dt).isoformat() != dt:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{what} {dt!r}: expected YYYY-MM-DD") from None
    return dt


# --------------------------------------------------------------------------------------
# the model meta file


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """``onerec_meta.json`` of ``model_dir`` (``{}`` for a plain HF directory or a missing dir)."""
    p = Path(model_dir) / META_FILE
    return json.loads(p.read_text()) if p.exists() else {}
