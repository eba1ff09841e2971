"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1 (a subprocess).

moto implements the S3 REST API in process memory; s3fs (Python side) and Hadoop's s3a connector
(Spark) talk to it over HTTP exactly as to an object store, with path-style addressing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "onerec-test"
SECRET_KEY = "onerec-test-secret"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen

    def env(self) -> dict[str, str]:
        """Credentials as both s3fs and the s3a connector read them."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION}

    def overrides(self) -> list[str]:
        """Config overrides that point the storage layer at this server."""
        return [f"storage.s3_endpoint_url={self.endpoint}", f"storage.s3_region={REGION}",
                "storage.s3_path_style=true"]

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str) -> list[str]:
        out, token = [], None
        c = self.client()
        while True:
            kw = {"Bucket": bucket, **({"ContinuationToken": token} if token else {})}
            page = c.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(out)
            token = page["NextContinuationToken"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# moto's server with one request at a time: moto checks a conditional write's precondition and
# stores the object in two steps without a lock, so its threaded server is not atomic where S3 is
_SERIAL = ("import sys, moto.server as m; run = m.run_simple; "
           "m.run_simple = lambda *a, **k: run(*a, **{**k, 'threaded': False}); sys.exit(m.main(sys.argv[1:]))")


def start_s3_server(log_path: Path, timeout_s: float = 60.0, serial: bool = False) -> S3Server:
    """Start moto's server on a free 127.0.0.1 port and wait until it answers.

    ``serial``: handle one request at a time, so conditional writes (``If-None-Match``/``If-Match``)
    are atomic as on S3; the lock tests need it.
    """
    port = _free_port()
    log = open(log_path, "ab")
    entry = ["-c", _SERIAL] if serial else ["-m", "moto.server"]
    proc = subprocess.Popen([sys.executable, *entry, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MOTO_CALL_RESET_API": "false"})
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}; see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return S3Server(f"http://127.0.0.1:{port}", proc)
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"moto server did not listen on 127.0.0.1:{port} within {timeout_s}s")


@contextlib.contextmanager
def s3_environment(log_path: Path, bucket: str, *, serial: bool = False) -> Iterator[S3Server]:
    """A started server with ``bucket`` created and its credentials/endpoint in ``os.environ``
    (what s3fs/boto3 in this process read); stops it and restores the environment on exit."""
    srv = start_s3_server(log_path, serial=serial)
    saved = {k: os.environ.get(k) for k in srv.env()}
    os.environ.update(srv.env())
    try:
        srv.create_bucket(bucket)
        yield srv
    finally:
        srv.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
