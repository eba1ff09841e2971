"""One filesystem layer for the pipeline's files: local paths and object stores alike.

Every Python-side read or write of a pipeline artefact (landing files and their completeness
marker, SID codebooks and the CURRENT pointer, Think-Ahead exports, run records) goes through
:class:`Storage`, built from ``cfg.storage`` by :func:`storage`. A location is a plain path or a
URI; ``s3://`` and ``s3a://`` name the same bucket (``s3a`` is Hadoop's scheme, which Spark
needs; fsspec/s3fs speak ``s3``), so a config can give one ``s3a://`` root to both sides.

Spark reaches the same roots through Hadoop's s3a connector (``hadoop-aws``, matching Spark's
bundled Hadoop); :func:`spark_s3a_conf` is the settings it needs, merged into ``spark.extra_conf``
by the config whenever a root is on an object store (see ``Config``). Delta's transaction log on
S3 is safe with ONE writing driver per table at a time (Delta's default ``S3SingleDriverLogStore``;
the DAG's ``max_active_runs=1`` and one Spark job per stage keep it so); several concurrent
writing drivers need the DynamoDB log store (``storage.delta_log_store=s3_dynamodb``).

Writes are atomic: local files are written to a temporary sibling and renamed; an object-store
PUT is atomic by itself (a reader sees the old object or the new one, never half of one).
Credentials never sit in the config: s3fs and the s3a connector both read ``AWS_ACCESS_KEY_ID``
/ ``AWS_SECRET_ACCESS_KEY`` from the environment (Kubernetes secrets in the cluster).
"""

from __future__ import annotations

import functools
import os
import posixpath
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # config imports nothing from here at runtime
    from onerec_prod.config import Config, StorageCfg

OBJECT_STORE_SCHEMES = ("s3", "s3a", "s3n")


def scheme(location: str | Path) -> str:
    """``"s3a"`` for ``s3a://b/k``, ``""`` for a local path."""
    text = str(location)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def is_remote(location: str | Path) -> bool:
    """True when ``location`` is on an object store (not a local or mounted path)."""
    return scheme(location) != "" and scheme(location) != "file"


def fsspec_url(location: str | Path) -> str:
    """The location as fsspec names it: ``s3a://``/``s3n://`` -> ``s3://``; local paths unchanged."""
    text = str(location)
    s = scheme(text)
    if s in ("s3a", "s3n"):
        return "s3://" + text.split("://", 1)[1]
    return text


def spark_url(location: str | Path) -> str:
    """The location as Hadoop names it: ``s3://`` -> ``s3a://`` (Hadoop has no ``s3`` connector)."""
    text = str(location)
    if scheme(text) == "s3":
        return "s3a://" + text.split("://", 1)[1]
    return text


def join(base: str | Path, *parts: str) -> str:
    """Join path segments onto a path or URI with ``/`` (never drops a URI's scheme)."""
    text = str(base)
    if is_remote(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return str(Path(text).joinpath(*parts))


class StorageError(RuntimeError):
    """An object-store location that cannot be used (unknown scheme, missing settings)."""


class Storage:
    """Files on a local path or an object store, with one set of operations.

    Built once per ``StorageCfg`` (:func:`storage`); every method takes a path or URI.
    """

    def __init__(self, cfg: StorageCfg):
        self.cfg = cfg

    # -- filesystem resolution
    def options(self, location: str | Path) -> dict[str, Any]:
        """fsspec storage options for ``location`` (endpoint, region, addressing style)."""
        s = scheme(location)
        if s in OBJECT_STORE_SCHEMES:
            client: dict[str, Any] = {"region_name": self.cfg.s3_region}
            opts: dict[str, Any] = {"client_kwargs": client}
            if self.cfg.s3_endpoint_url:
                opts["endpoint_url"] = self.cfg.s3_endpoint_url
            if self.cfg.s3_path_style:
                opts["config_kwargs"] = {"s3": {"addressing_style": "path"}}
            return opts
        if s in ("", "file"):
            return {}
        raise StorageError(f"{location}: scheme {s!r} is not supported (local paths and "
                           f"{'/'.join(x + '://' for x in OBJECT_STORE_SCHEMES)} are)")

    def fs(self, location: str | Path):
        """``(filesystem, path)`` of ``location``."""
        import fsspec

        return fsspec.core.url_to_fs(fsspec_url(location), **self.options(location))

    # -- queries
    def exists(self, location: str | Path) -> bool:
        fs, p = self.fs(location)
        return bool(fs.exists(p))

    def isdir(self, location: str | Path) -> bool:
        fs, p = self.fs(location)
        return bool(fs.isdir(p))

    def listdir(self, location: str | Path) -> list[str]:
        """Names (not paths) of the entries directly under ``location`` ([] when absent)."""
        fs, p = self.fs(location)
        try:
            entries = fs.ls(p, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

    # -- reads
    def read_bytes(self, location: str | Path) -> bytes:
        fs, p = self.fs(location)
        return fs.cat_file(p)

    def read_text(self, location: str | Path) -> str:
        return self.read_bytes(location).decode()

    def open(self, location: str | Path, mode: str = "rb"):
        """A file object (reads; writes go through :meth:`write_bytes` so they stay atomic)."""
        if "r" not in mode:
            raise ValueError("Storage.open is for reading; write with write_bytes/write_text (atomic)")
        fs, p = self.fs(location)
        return fs.open(p, mode)

    # -- writes
    def makedirs(self, location: str | Path) -> None:
        """Create a directory (a no-op on object stores, which have no directories)."""
        if not is_remote(location):
            Path(location).mkdir(parents=True, exist_ok=True)

    def write_bytes(self, location: str | Path, data: bytes) -> str:
        """Atomically write ``data`` to ``location`` (temp + rename locally; one PUT remotely)."""
        text = str(location)
        if is_remote(text):
            fs, p = self.fs(text)
            fs.pipe_file(p, data)
            return text
        path = Path(text)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return text

    def write_text(self, location: str | Path, text: str) -> str:
        return self.write_bytes(location, text.encode())

    def rm(self, location: str | Path, recursive: bool = False) -> None:
        """Remove a file (or a tree with ``recursive``); absent is fine."""
        fs, p = self.fs(location)
        try:
            fs.rm(p, recursive=recursive)
        except FileNotFoundError:
            pass

    def put_dir(self, local_dir: str | Path, location: str | Path) -> str:
        """Copy the local directory ``local_dir`` to ``location`` (files keep their relative paths)."""
        local_dir = Path(local_dir)
        for f in sorted(local_dir.rglob("*")):
            if f.is_file():
                self.write_bytes(join(location, *f.relative_to(local_dir).parts), f.read_bytes())
        return str(location)

    def get_dir(self, location: str | Path, local_dir: str | Path) -> Path:
        """Copy the tree at ``location`` into ``local_dir`` (a local path; returns it)."""
        local_dir = Path(local_dir)
        fs, p = self.fs(location)
        root = p.rstrip("/")
        for f in fs.find(root):
            rel = str(f)[len(root):].lstrip("/")
            dst = local_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(fs.cat_file(f))
        return local_dir


@functools.lru_cache(maxsize=8)
def _storage(cfg: StorageCfg) -> Storage:
    return Storage(cfg)


_ACTIVE: Storage | None = None


def storage(cfg: Config | StorageCfg) -> Storage:
    """The :class:`Storage` of a config (or of its ``storage`` group).

    The last one asked for is also what :func:`for_location` answers: helpers that get a bare
    location (an export directory handed from precompute to the service) reach the same endpoint.
    """
    global _ACTIVE
    group = getattr(cfg, "storage", cfg)
    if group.s3_endpoint_url:
        # MLflow's own S3 artefact client (an s3:// artifact_location) reads its endpoint from here only
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", group.s3_endpoint_url)
    _ACTIVE = _storage(group)
    return _ACTIVE


def for_location(location: str | Path) -> Storage:
    """The :class:`Storage` for a bare location: the process's configured one, else the defaults."""
    if _ACTIVE is not None:
        return _ACTIVE
    from onerec_prod.config import StorageCfg

    return _storage(StorageCfg())


def child(base: str | Path, *parts: str) -> str | Path:
    """``base/parts``: a ``Path`` for a local base (callers keep their Path API), a URI otherwise."""
    return join(base, *parts) if is_remote(base) else Path(base).joinpath(*parts)


def spark_s3a_conf(cfg: StorageCfg) -> dict[str, str]:
    """Spark settings for ``s3a://`` roots (see :meth:`onerec_prod.config.StorageCfg.spark_s3a_conf`)."""
    return cfg.spark_s3a_conf()


