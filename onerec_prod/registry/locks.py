"""Mutual exclusion for alias moves across machines: one lock object on the object store.

The registry's alias moves (promote, rollback, register) read the aliases, decide, and write
them; two of them interleaved leave ``previous`` pointing at the wrong version. On one machine
an ``flock`` next to the sqlite store serialises them (:func:`onerec_prod.registry.tracking.file_lock`).
Pods of the cluster share no file system lock, and the MLflow REST API has no compare-and-set,
so the lock lives on the object store, where S3 gives a real one:

- **acquire** = ``PutObject(key, IfNoneMatch="*")``: the store creates the object only if no
  object has that key; of any number of racing writers exactly one gets 200, the others 412
  ``PreconditionFailed``. No read-then-write window, no sleep-and-re-read.
- **owner token**: the body is JSON ``{"owner": <uuid>, "host", "pid", "actor", "ttl_s",
  "acquired_at"}``; the holder keeps the ``ETag`` of its write.
- **release** = ``DeleteObject(key, IfMatch=<our ETag>)``: only the holder's own object is
  deleted. A 412 means the lock was taken over while held (the holder overran its TTL):
  :class:`LockLost` is raised, naming the new owner, so the operator checks the aliases.
- **stale lock** (a holder killed inside its critical section): a lock older than its holder's
  ``ttl_s`` is taken over with ``PutObject(key, IfMatch=<stale ETag>)``, so of several waiters
  that saw the same stale lock exactly one replaces it. The age is measured on the store's own
  clock (response ``Date`` minus the object's ``LastModified``), so clock skew between pods
  does not matter. The takeover is logged as a WARNING naming the dead owner.
- **timeout**: a live lock still held after ``timeout_s`` raises :class:`LockTimeout` naming
  its owner, host, pid, age and the object's URI (delete it by hand only if that process is
  known to be dead).

A holder that pauses for longer than its TTL can be overtaken; ``registry.lock_ttl_s``
(minutes) is far above an alias move (seconds), and the release check reports it if it happens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

log = logging.getLogger(__name__)


class LockTimeout(TimeoutError):
    """The lock is held by a live owner for longer than the caller waits."""


class LockLost(RuntimeError):
    """The lock was taken over while held (the holder overran its TTL)."""


@dataclass(frozen=True)
class Holder:
    """What a lock object says about its owner, and how old it is on the store's clock."""

    owner: str
    host: str
    pid: int
    actor: str
    ttl_s: float
    acquired_at: str
    age_s: float
    etag: str

    @property
    def stale(self) -> bool:
        return self.age_s > self.ttl_s

    def describe(self) -> str:
        return (f"owner {self.owner} (host {self.host}, pid {self.pid}, actor {self.actor}) since "
                f"{self.acquired_at}, {self.age_s:.0f}s old, ttl {self.ttl_s:.0f}s")


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` (or ``s3a://``) -> ``("bucket", "a/b")``."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("s3", "s3a", "s3n") or not rest.split("/", 1)[0]:
        raise ValueError(f"not an object-store URI: {uri!r} (expected s3://bucket/key)")
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


def s3_client(endpoint_url: str | None, region: str, path_style: bool) -> Any:
    """A botocore S3 client (botocore comes with s3fs; credentials from the AWS_* variables)."""
    import botocore.config
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint_url, region_name=region,
        config=botocore.config.Config(s3={"addressing_style": "path" if path_style else "auto"},
                                      retries={"max_attempts": 3, "mode": "standard"}),
    )


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _status(e: Exception) -> int:
    return int(getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _conflict(e: Exception) -> bool:
    """412 (condition failed) or 409 (a concurrent conditional write on the same key)."""
    return _code(e) in ("PreconditionFailed", "ConditionalRequestConflict") or _status(e) in (409, 412)


def _missing(e: Exception) -> bool:
    return _code(e) in ("NoSuchKey", "404", "NotFound") or _status(e) == 404


class ObjectStoreLock:
    """An exclusive lock on ``s3://bucket/key`` by conditional writes (see the module docstring).

    ``on_wait(holder)`` is called each time an attempt finds the lock held by a live owner
    (the registry logs it; tests use it to prove that two holders contended).
    """

    def __init__(self, client: Any, bucket: str, key: str, *, ttl_s: float, timeout_s: float,
                 actor: str = "", on_wait: Callable[[Holder], None] | None = None):
        self.client, self.bucket, self.key = client, bucket, key
        self.ttl_s, self.timeout_s, self.actor = ttl_s, timeout_s, actor
        self.on_wait = on_wait
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "actor": self.actor, "ttl_s": self.ttl_s,
                           "acquired_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()

    def _put(self, **cond: str) -> bool:
        """One conditional write; True if this process now holds the lock."""
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                          ContentType="application/json", **cond)
        except Exception as e:
            if _conflict(e) or ("IfMatch" in cond and _missing(e)):
                return False
            raise
        self.etag = resp["ETag"]
        return True

    def read(self) -> Holder | None:
        """The current holder (None if the lock is free)."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:
            if _missing(e):
                return None
            raise
        raw = resp["Body"].read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"owner": f"<unreadable lock body {raw[:60]!r}>"}
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        age = max(0.0, now - resp["LastModified"].timestamp())
        return Holder(owner=str(body.get("owner", "?")), host=str(body.get("host", "?")),
                      pid=int(body.get("pid", -1)), actor=str(body.get("actor", "")),
                      ttl_s=float(body.get("ttl_s", self.ttl_s)), acquired_at=str(body.get("acquired_at", "?")),
                      age_s=age, etag=resp["ETag"])

    def acquire(self) -> None:
        """Take the lock, waiting up to ``timeout_s``; a stale lock is taken over (WARNING).

        Raises:
            LockTimeout: a live owner still holds it after ``timeout_s``.
        """
        deadline = time.monotonic() + self.timeout_s
        delay = 0.05
        while True:
            if self._put(IfNoneMatch="*"):
                log.debug("lock %s acquired by %s", self.uri, self.owner)
                return
            holder = self.read()
            if holder is None:
                continue  # released between our write and our read: try again at once
            if holder.stale:
                if self._put(IfMatch=holder.etag):
                    log.warning("lock %s: took over a STALE lock (%s): its holder died or hung inside an "
                                "alias move; check the aliases (`onerec-prod status`)", self.uri, holder.describe())
                    return
                continue  # another waiter replaced the stale lock first
            if self.on_wait is not None:
                self.on_wait(holder)
            if time.monotonic() > deadline:
                raise LockTimeout(
                    f"lock {self.uri} still held after {self.timeout_s:.0f}s by {holder.describe()}. "
                    f"It expires by itself after its ttl; if that process is known dead, delete {self.uri}."
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def release(self) -> None:
        """Delete the lock object if it is still ours.

        Raises:
            LockLost: the object is another owner's (ours expired and was taken over).
        """
        if self.etag is None:
            return
        etag, self.etag = self.etag, None
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
            return
        except Exception as e:
            if _missing(e):
                raise LockLost(f"lock {self.uri} of {self.owner} was gone at release: it expired "
                               "(held longer than its ttl) and was taken over and released") from e
            if not _conflict(e) and _code(e) not in ("NotImplemented", "InvalidArgument"):
                raise
            if _conflict(e):
                holder = self.read()
                raise LockLost(
                    f"lock {self.uri} of {self.owner} was taken over while held (held longer than its ttl "
                    f"{self.ttl_s:.0f}s); now: {holder.describe() if holder else 'free'}. Another alias move "
                    "may have run concurrently: check the aliases (`onerec-prod status`)"
                ) from e
        # a store without conditional deletes: read, compare the owner, delete
        holder = self.read()
        if holder is None or holder.owner != self.owner:
            raise LockLost(f"lock {self.uri} of {self.owner} was taken over while held; now: "
                           f"{holder.describe() if holder else 'free'}")
        self.client.delete_object(Bucket=self.bucket, Key=self.key)

    @contextlib.contextmanager
    def held(self) -> Iterator[ObjectStoreLock]:
        """Hold the lock for the ``with`` body. A :class:`LockLost` at release is raised after a
        clean body, and logged (not masking it) after a body that raised."""
        self.acquire()
        try:
            yield self
        except BaseException:
            try:
                self.release()
            except LockLost as e:
                log.error("%s", e)
            raise
        self.release()
