"""The MLflow model registry: versions with lineage, and the aliases serving follows.

Aliases (never stages): ``champion`` (served), ``challenger`` (latest candidate that passed
the gate), ``previous`` (the champion before the last promote).

- ``register`` logs a model dir as artefacts of day ``dt``'s ``register`` step run and creates
  a version whose tags carry its lineage (``dt``/``ds``, ``parent_version``, ``sid_version``,
  ``data_versions``, ``data_snapshot``, ``config_hash``, ``git_sha``, ``weights_hash``). Same
  ``dt`` and same weights -> the same version.
- ``promote``: ``previous <- champion``, then ``champion <- version`` (default: the
  challenger), under a lock; the version's ``gate_passed`` tag must be ``true`` unless
  ``force`` (which needs a reason; actor, reason and time become version tags).
- ``rollback``: ``champion <- previous`` and ``previous`` is CLEARED (a second rollback
  refuses instead of flipping back to the bad version); the rolled-back version is tagged
  ``rolled_back=true`` and ``promote`` refuses it again unless forced.

An alias points to one version by construction; the lock keeps champion/previous consistent
under concurrent promotes: an ``flock`` next to the sqlite store (one machine), or a lock
object on the object store taken by a conditional write (``If-None-Match: *``; pods sharing a
tracking server; :mod:`onerec_prod.registry.locks`).
Every move is ordered so that a crash in between leaves ``previous == champion`` (the old
champion still serving); rerunning the command completes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onerec_prod.config import Config
from onerec_prod.registry import tracking
from onerec_prod.util import read_meta

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"


class RegistryError(RuntimeError):
    """A registry operation cannot proceed; the message says why and what to do."""


class GateNotPassedError(RegistryError):
    """Promotion of a version whose gate did not pass, without ``force``."""


# --------------------------------------------------------------------------------------
# helpers


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def weights_hash(model_dir: str | Path) -> str:
    """The model's weights hash: :func:`onerec_prod.model.io.weights_hash` (over the tensors of the
    ``*.safetensors`` files, so it equals the ``weights_sha256`` the trainer wrote in the model's
    meta); for a directory without safetensors, sha256 over every file's path and bytes."""
    root = Path(model_dir)
    if any(root.glob("*.safetensors")):
        from onerec_prod.model.io import weights_hash as tensor_hash

        return tensor_hash(root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"model dir {root} holds no files")
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _ensure_model(c: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            c.create_registered_model(name, description="onerec-prod daily model (aliases: champion/challenger/previous)")
        except MlflowException:
            c.get_registered_model(name)  # created meanwhile; re-raise if it really failed


def _aliases(c: MlflowClient, name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return {k: str(v) for k, v in c.get_registered_model(name).aliases.items()}
    except MlflowException:
        return {}


def _versions(c: MlflowClient, name: str) -> list[ModelVersion]:
    out, token = [], None
    while True:
        page = c.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return sorted(out, key=lambda v: int(v.version))


def _get_version(c: MlflowClient, name: str, version: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"model {name!r} has no version {version!r}") from e


def _dumps(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------
# the version's page: a markdown description built from its tags, and its data inputs


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def describe_version(name: str, version: str, tags: dict[str, str]) -> str:
    """Markdown of a version for the MLflow UI: why it exists, what trained it, what happened to it.

    Built only from the version's tags (one source of truth): verdict and gate table, metrics,
    parent version, data (Delta table versions), code and config, then the promote/rollback
    history with actors and reasons.
    """
    gate = _loads(tags.get("gate")) or {}
    metrics = _loads(tags.get("metrics")) or {}
    data = _loads(tags.get("data_versions")) or {}
    history = _loads(tags.get("history")) or []
    state = "**rolled back**" if tags.get("rolled_back") == "true" else (
        "promoted" if tags.get("promoted_at") else "candidate")
    lines = [f"## {name} v{version} (dt={tags.get('dt', '?')}): {state}", ""]
    if tags.get("rolled_back") == "true":
        lines += [f"> Rolled back at {tags.get('rolled_back_at')} by {tags.get('rolled_back_by')} "
                  f"(champion back to v{tags.get('rolled_back_to')}). Reason: {tags.get('rollback_reason', '')}", ""]
    if gate:
        verdict = "PASSED" if gate.get("passed") else ("FAILED (not blocking)" if gate.get("passed_effective")
                                                       else "FAILED")
        lines += [f"### Gate: {verdict} (mode {gate.get('mode')}; compared with champion "
                  f"v{gate.get('champion_version') or '-'}, {gate.get('champion_metrics_source', '')})", "",
                  "| metric | check | value | threshold | champion | passed |", "|---|---|---|---|---|---|"]
        for c in gate.get("checks", []):
            lines.append(f"| {c['metric']} | {c['kind']} | {_fmt(c.get('value'))} | {_fmt(c.get('threshold'))} "
                         f"| {_fmt(c.get('champion_value'))} | {'yes' if c.get('passed') else '**no**'} |")
        lines.append("")
    else:
        lines += ["### Gate: not gated yet", ""]
    if metrics:
        lines += ["### Metrics (eval snapshot of dt)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
        lines.append("")
    parent = tags.get("parent_version") or "none (bootstrap)"
    lines += ["### Lineage", "", f"- parent version: {parent}", f"- sid_version: {tags.get('sid_version') or '-'}",
              f"- data snapshot: {tags.get('data_snapshot', '-')}",
              f"- git commit: `{tags.get('git_sha', '-')}`, config hash `{tags.get('config_hash', '-')}`",
              f"- weights sha256: `{tags.get('weights_hash', '-')[:16]}`", ""]
    if data:
        lines += ["| Delta table | version |", "|---|---|"]
        lines += [f"| {t} | {v} |" for t, v in sorted(data.items())]
        lines.append("")
    if history:
        lines += ["### History", "", "| at | event | actor | reason |", "|---|---|---|---|"]
        for h in history:
            what = h.get("event", "")
            if h.get("previous") is not None and what == "promoted":
                what += f" (previous champion v{h['previous']})"
            if h.get("by_version"):
                what += f" by v{h['by_version']}"
            if h.get("rolled_back"):
                what += f" (v{h['rolled_back']} rolled back)"
            if h.get("forced"):
                what += ", forced"
            lines.append(f"| {h.get('at', '')} | {what} | {h.get('actor', '')} | {h.get('reason', '')} |")
        lines.append("")
    return "\n".join(lines)


def _refresh_description(c: MlflowClient, name: str, version: str) -> None:
    mv = c.get_model_version(name, version)
    c.update_model_version(name, version, description=describe_version(name, version, dict(mv.tags)))


def _append_history(c: MlflowClient, name: str, version: str, event: dict[str, Any]) -> None:
    """Append a promote/rollback event to the version's ``history`` tag and rewrite its description."""
    mv = c.get_model_version(name, version)
    hist = _loads(mv.tags.get("history")) or []
    hist.append(event)
    while len(_dumps(hist)) > tracking.MAX_TAG_LEN and len(hist) > 1:  # keep the newest events
        hist.pop(0)
    c.set_model_version_tag(name, version, "history", _dumps(hist))
    _refresh_description(c, name, version)


def _log_data_inputs(cfg: Config, run_id: str, data_versions: dict[str, Any]) -> None:
    """The Delta tables (at their versions) that made the candidate, as MLflow dataset inputs."""
    from mlflow.data.delta_dataset_source import DeltaDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    from onerec_prod.lake import table_path

    inputs = []
    for table, version in sorted(_flat_versions(data_versions).items()):
        try:
            path = table_path(cfg, table.split(".")[-1])
        except Exception:  # noqa: BLE001 (a name that is not a lake table: keep it as a plain name)
            path = table
        ds = MetaDataset(DeltaDatasetSource(path=str(path), delta_table_version=int(version)),
                         name=f"{table}@v{int(version)}")
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")]))
    if inputs:
        tracking.client(cfg).log_inputs(run_id, datasets=inputs)


def _flat_versions(d: dict[str, Any], prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat_versions(v, f"{prefix}{k}."))
        elif isinstance(v, int) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------------------
# the alias lock


def _log_lock_wait(what: str) -> None:
    """One INFO line per wait (``extra={"lock_wait": ...}`` names the holder for log processors)."""
    log.info("alias lock held by %s; waiting", what, extra={"lock_wait": what})


@contextlib.contextmanager
def alias_lock(cfg: Config) -> Iterator[None]:
    """Serialise alias moves (and registration) across processes; see the module docstring.

    ``file``: ``flock`` next to the sqlite store (processes of one machine). ``object``: one lock
    object per registered model under ``registry.lock_uri`` taken by a conditional write
    (:class:`onerec_prod.registry.locks.ObjectStoreLock`: exactly one of the racing pods holds
    it; a stale one, older than ``registry.lock_ttl_s``, is taken over with a WARNING).

    Raises:
        TimeoutError: the lock is still held by a live owner after ``registry.lock_timeout_s``
            (the message names the owner and, for the object lock, its host, pid and URI).
        locks.LockLost: the object lock was taken over while held (held past its TTL).
    """
    mode = tracking.lock_mode(cfg)
    waited: set[str] = set()

    def on_wait(what: str) -> None:
        if what not in waited:
            waited.add(what)
            _log_lock_wait(what)

    if mode == "file":
        with tracking.file_lock(tracking.lock_path(cfg, "aliases"), cfg.registry.lock_timeout_s, on_wait):
            yield
        return
    from onerec_prod.registry import locks

    bucket, prefix = locks.split_uri(tracking.object_lock_root(cfg))
    key = f"{prefix}/registry-{cfg.registry.model_name}.aliases.lock".lstrip("/")
    s = cfg.storage
    lock = locks.ObjectStoreLock(
        locks.s3_client(s.s3_endpoint_url, s.s3_region, s.s3_path_style), bucket, key,
        ttl_s=cfg.registry.lock_ttl_s, timeout_s=cfg.registry.lock_timeout_s,
        actor=os.environ.get("USER", ""), on_wait=lambda h: on_wait(h.describe()),
    )
    with lock.held():
        yield


# --------------------------------------------------------------------------------------
# register, gate record, challenger


def _find_registered(c: MlflowClient, name: str, dt: str, whash: str) -> list[ModelVersion]:
    return [
        v for v in _versions(c, name) if v.tags.get("dt") == dt and v.tags.get("weights_hash") == whash
    ]


def register(cfg: Config, model_dir: str | Path, dt: str, lineage: dict[str, Any], *,
             catalog: list[dict[str, Any]] | None = None) -> str:
    """Register ``model_dir`` as a version of ``cfg.registry.model_name``; returns the version.

    Args:
        lineage: ``parent_version`` (or ``parent``), ``sid_version``, ``data_versions`` (dict of
            Delta table -> version), ``data_snapshot``; any other keys are kept in tag ``lineage``.
        catalog: the catalog rows (``item_id, title, categories, sid``) of the model's
            sid_version. Given: the version is a real MLflow pyfunc model (signature, input
            example; ``mlflow.pyfunc.load_model("models:/<name>@champion")`` answers histories,
            see :mod:`onerec_prod.registry.pyfunc`). None: the plain model folder.

    Idempotent per ``dt``: the same ``dt`` and the same weights give back the existing version.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model dir {model_dir} does not exist")
    c, name = tracking.client(cfg), cfg.registry.model_name
    _ensure_model(c, name)
    whash = weights_hash(model_dir)
    found = _find_registered(c, name, dt, whash)
    if found:
        log.info("model %s (dt=%s, weights %s) already registered as version %s", model_dir, dt, whash[:12], found[0].version)
        return str(found[0].version)

    art = f"model-{whash[:12]}"
    with tempfile.TemporaryDirectory(prefix="onerec-register-") as tmp:
        logged: Path = model_dir
        if catalog is not None:
            from onerec_prod.registry.pyfunc import save_pyfunc

            logged = save_pyfunc(cfg, model_dir, catalog, Path(tmp) / art,
                                 metadata_={"dt": dt, "weights_hash": whash})
        run_id = tracking.log_step(
            cfg, dt, "register", tags={"weights_hash": whash, "model_dir": str(model_dir),
                                       "model_format": "pyfunc" if catalog is not None else "folder"},
            artifacts={art: logged},
        )
    _log_data_inputs(cfg, run_id, lineage.get("data_versions") or {})
    source = tracking.step_artifact_uri(cfg, run_id, art)
    parent = lineage.get("parent_version", lineage.get("parent"))
    tags = {
        "dt": dt,
        "ds": dt,
        "parent_version": "" if parent is None else str(parent),
        "sid_version": str(lineage.get("sid_version", "")),
        "data_versions": _dumps(lineage.get("data_versions", {})),
        "data_snapshot": str(lineage.get("data_snapshot", dt)),
        "config_hash": cfg.digest(),
        "git_sha": tracking.git_sha(),
        "weights_hash": whash,
        "lineage": _dumps(lineage),
    }
    with alias_lock(cfg):
        found = _find_registered(c, name, dt, whash)
        if found:
            return str(found[0].version)
        mv = c.create_model_version(name, source=source, run_id=run_id, tags=tags, description=f"dt={dt}")
        _refresh_description(c, name, str(mv.version))
    log.info("registered %s version %s (dt=%s, weights %s)", name, mv.version, dt, whash[:12])
    return str(mv.version)


def record_gate(cfg: Config, version: str, result: dict[str, Any], metrics: dict[str, float]) -> None:
    """Tag ``version`` with its gate verdict (``gate_passed`` = effective verdict) and metrics."""
    c, name = tracking.client(cfg), cfg.registry.model_name
    for key, value in {
        "gate_passed": str(bool(result["passed_effective"])).lower(),
        "gate_passed_raw": str(bool(result["passed"])).lower(),
        "gate_mode": result["mode"],
        "gate": _dumps(result),
        "metrics": _dumps(metrics),
        "gated_at": _now(),
    }.items():
        c.set_model_version_tag(name, str(version), key, value)
    _refresh_description(c, name, str(version))


def set_challenger(cfg: Config, version: str) -> None:
    """Point ``challenger`` at ``version`` (a no-op if it already does)."""
    c, name = tracking.client(cfg), cfg.registry.model_name
    _get_version(c, name, version)
    c.set_registered_model_alias(name, CHALLENGER, str(version))
    log.info("challenger -> %s version %s", name, version)


def aliases(cfg: Config) -> dict[str, str]:
    """Current ``alias -> version`` of the registered model ({} if it does not exist)."""
    return _aliases(tracking.client(cfg), cfg.registry.model_name)


# --------------------------------------------------------------------------------------
# promote / rollback


def _log_event(cfg: Config, dt: str | None, kind: str, event: dict[str, Any]) -> None:
    if not dt:
        return
    stamp = event["at"].replace(":", "").replace("-", "")
    tracking.log_step(cfg, dt, kind, tags={f"{kind}.last": _dumps(event)}, artifacts={f"events/{kind}-{stamp}-{uuid.uuid4().hex[:6]}": event})


def promote(
    cfg: Config,
    version: str | int | None = None,
    *,
    force: bool = False,
    reason: str | None = None,
    actor: str | None = None,
) -> dict[str, Any]:
    """Move ``champion`` to ``version`` (default: the challenger); ``previous`` <- old champion.

    Returns:
        ``{"champion", "previous", "changed", "forced", "actor", "reason"}``.

    Raises:
        ValueError: ``force`` without a ``reason``.
        GateNotPassedError: the version's gate did not pass (or it was rolled back) and not ``force``.
        RegistryError: no such version / no challenger.
    """
    if force and not (reason and reason.strip()):
        raise ValueError("a forced promote needs a reason (--reason TEXT); it is recorded on the version")
    actor = actor or os.environ.get("USER") or "unknown"
    c, name = tracking.client(cfg), cfg.registry.model_name
    _ensure_model(c, name)
    with alias_lock(cfg):
        for _attempt in range(5):
            al = _aliases(c, name)
            target = str(version) if version is not None else al.get(CHALLENGER)
            if not target:
                raise RegistryError(f"{name!r} has no challenger to promote; pass --version N")
            mv = _get_version(c, name, target)
            if not force:
                if mv.tags.get("gate_passed") != "true":
                    raise GateNotPassedError(
                        f"{name} version {target}: gate did not pass (gate_passed="
                        f"{mv.tags.get('gate_passed', 'never gated')}); use --force --reason TEXT to override"
                    )
                if mv.tags.get("rolled_back") == "true":
                    raise GateNotPassedError(
                        f"{name} version {target} was rolled back at {mv.tags.get('rolled_back_at')}; "
                        "use --force --reason TEXT to promote it again"
                    )
                gated_against = (_loads(mv.tags.get("gate")) or {}).get("champion_version")
                if al.get(CHAMPION) not in (gated_against, target):
                    raise GateNotPassedError(
                        f"{name} version {target} was gated against champion {gated_against} but the "
                        f"champion is now {al.get(CHAMPION)}: re-evaluate and gate it, or --force --reason TEXT"
                    )
            old = al.get(CHAMPION)
            if old == target:
                log.info("%s version %s is already champion", name, target)
                return {"champion": target, "previous": al.get(PREVIOUS), "changed": False,
                        "forced": force, "actor": actor, "reason": reason}
            if old is not None:
                c.set_registered_model_alias(name, PREVIOUS, old)
            c.set_registered_model_alias(name, CHAMPION, target)
            if al.get(CHALLENGER) == target:
                c.delete_registered_model_alias(name, CHALLENGER)
            after = _aliases(c, name)
            if after.get(CHAMPION) == target and after.get(PREVIOUS) == (old if old is not None else al.get(PREVIOUS)):
                break
            log.warning("aliases of %s changed under a promote (%s); retrying", name, after)
        else:
            raise RegistryError(f"could not move the aliases of {name!r} consistently after 5 tries")
        event = {"at": _now(), "actor": actor, "reason": reason or "", "forced": force,
                 "version": target, "previous": old}
        tags = {"promoted_at": event["at"], "promoted_by": actor, "promote_forced": str(force).lower()}
        if reason:
            tags["promote_reason"] = reason
        for k, v in tags.items():
            c.set_model_version_tag(name, target, k, v)
        if mv.tags.get("rolled_back") == "true":
            c.set_model_version_tag(name, target, "rolled_back", "false")
        _append_history(c, name, target, {"event": "promoted", **event})
        if old is not None:
            _append_history(c, name, old, {"event": "replaced", "at": event["at"], "by_version": target,
                                           "actor": actor, "reason": reason or ""})
    log.warning("promoted %s version %s to champion (previous=%s, forced=%s, by %s%s)",
                name, target, old, force, actor, f": {reason}" if reason else "")
    _log_event(cfg, mv.tags.get("dt"), "promote", event)
    return {"champion": target, "previous": old, "changed": True, "forced": force, "actor": actor, "reason": reason}


def rollback(cfg: Config, *, actor: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """Move ``champion`` back to ``previous`` and clear ``previous``.

    Returns:
        ``{"champion", "rolled_back", "previous": None, "changed"}``.

    Raises:
        RegistryError: there is no ``previous`` version.
    """
    actor = actor or os.environ.get("USER") or "unknown"
    c, name = tracking.client(cfg), cfg.registry.model_name
    with alias_lock(cfg):
        al = _aliases(c, name)
        cur, prev = al.get(CHAMPION), al.get(PREVIOUS)
        if prev is None:
            raise RegistryError(f"{name!r} has no previous version to roll back to (champion={cur})")
        if cur == prev:  # an interrupted promote/rollback: champion is already previous
            c.delete_registered_model_alias(name, PREVIOUS)
            return {"champion": cur, "rolled_back": None, "previous": None, "changed": False}
        event = {"at": _now(), "actor": actor, "reason": reason or "", "rolled_back": cur, "champion": prev}
        # tag the bad version first: a crash before the alias moves leaves it marked (no automatic
        # promote picks it again) and still champion; rerunning the rollback finishes the job
        if cur is not None:
            for k, v in {"rolled_back": "true", "rolled_back_at": event["at"], "rolled_back_by": actor,
                         "rolled_back_to": prev, "rollback_reason": reason or "(no reason given)"}.items():
                c.set_model_version_tag(name, cur, k, v)
            _append_history(c, name, cur, {"event": "rolled_back", **event})
        _append_history(c, name, prev, {"event": "restored", "at": event["at"], "actor": actor,
                                        "reason": reason or "", "rolled_back": cur})
        c.set_registered_model_alias(name, CHAMPION, prev)
        c.delete_registered_model_alias(name, PREVIOUS)
    log.warning("rolled back %s: champion %s -> %s (by %s)", name, cur, prev, actor)
    dt = _get_version(c, name, cur).tags.get("dt") if cur is not None else None
    _log_event(cfg, dt, "rollback", event)
    return {"champion": prev, "rolled_back": cur, "previous": None, "changed": True}


# --------------------------------------------------------------------------------------
# resolving and downloading


def _cache_root(cfg: Config, name: str) -> Path:
    return cfg.paths.var / "cache" / "models" / name


def version_dir(cfg: Config, version: str | int, name: str | None = None) -> Path:
    """Local dir of a version's model files (downloaded once into ``var/cache/models``).

    Every call checks the files against the version's ``weights_hash`` tag, the cached copy too
    (a cache entry is keyed by version number only, and a disk or a hand can change it): a
    mismatch in the cache is re-downloaded, a mismatch in a download raises. A version without
    a ``weights_hash`` tag is refused: nothing unverified is ever served or trained from.
    """
    from mlflow.artifacts import download_artifacts

    c, name = tracking.client(cfg), name or cfg.registry.model_name
    mv = _get_version(c, name, str(version))
    expected = mv.tags.get("weights_hash")
    if not expected:
        raise RegistryError(f"{name} version {version} has no weights_hash tag: refusing to load unverified "
                            "weights (register it with `onerec-prod gate`, which tags the hash)")
    dest = _cache_root(cfg, name) / f"v{version}"
    if dest.is_dir():
        if weights_hash(dest) == expected:
            return dest
        log.error("cached %s version %s does not match its weights_hash %s: downloading it again",
                  name, version, expected[:12])
        stale = dest.with_name(f".stale-v{version}-{uuid.uuid4().hex[:8]}")
        os.rename(dest, stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = _cache_root(cfg, name) / f".tmp-v{version}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        got = Path(download_artifacts(artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=cfg.mlflow_uri))
        from onerec_prod.registry.pyfunc import weights_dir

        got = weights_dir(got)  # a pyfunc model keeps the project's model dir as its artifact
        if weights_hash(got) != expected:
            raise RegistryError(f"{name} version {version}: downloaded weights do not match weights_hash {expected[:12]}")
        try:
            os.rename(got, dest)
        except OSError:
            if not dest.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_version(cfg: Config, uri: str) -> tuple[str, str]:
    """``models:/name@alias`` or ``models:/name/N`` -> ``(name, version)``."""
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        raise ValueError(f"not a models:/ URI: {uri!r}")
    body = uri[len("models:/") :].strip("/")
    c = tracking.client(cfg)
    if "@" in body:
        name, alias = body.split("@", 1)
        try:
            return name, str(c.get_model_version_by_alias(name, alias).version)
        except MlflowException as e:
            raise RegistryError(f"{uri}: model {name!r} has no alias {alias!r}") from e
    name, _, ver = body.rpartition("/")
    if not name or not ver.isdigit():
        raise ValueError(f"expected models:/name@alias or models:/name/N, got {uri!r}")
    return name, str(_get_version(c, name, ver).version)


def resolve_model_dir(cfg: Config, uri_or_dir: str | Path) -> Path:
    """A local model dir from a local path, ``models:/name@alias`` or ``models:/name/N``."""
    text = str(uri_or_dir)
    if text.startswith("models:/"):
        name, version = resolve_version(cfg, text)
        return version_dir(cfg, version, name)
    path = Path(text)
    if not path.is_dir():
        raise FileNotFoundError(f"model dir {path} does not exist (or pass models:/name@alias)")
    return path


def local_version(model_dir: str | Path) -> str:
    """Stable label of an unregistered model dir: ``local-`` + hash of its recorded weights hash.

    Falls back to the dir's resolved path when ``onerec_meta.json`` has no ``weights_sha256``.
    """
    key = read_meta(model_dir).get("weights_sha256") or str(Path(model_dir).resolve())
    return "local-" + hashlib.sha256(str(key).encode()).hexdigest()[:12]


def resolve_model(cfg: Config, spec: str | None, version: str | None = None) -> tuple[str, Path]:
    """``(model_version, local dir)`` of a model spec (dir, ``models:/`` URI, or None = champion).

    A local dir is labelled ``version`` or :func:`local_version`; a registry version must agree
    with ``version`` when both are given (the precompute and serving key their rows by it).
    """
    spec = spec or f"models:/{cfg.registry.model_name}@champion"
    if spec.startswith("models:/"):
        _, resolved = resolve_version(cfg, spec)
        if version is not None and version != resolved:
            raise ValueError(f"--model-version {version} contradicts {spec} (version {resolved})")
        return resolved, version_dir(cfg, resolved, spec[len("models:/"):].split("@")[0].split("/")[0])
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {spec}: not a directory (or pass models:/name@alias)")
    return version or local_version(path), path


def champion(cfg: Config) -> tuple[str, Path] | None:
    """``(version, local model dir)`` of the champion, or None when there is none."""
    version = aliases(cfg).get(CHAMPION)
    if version is None:
        return None
    return version, version_dir(cfg, version)


# --------------------------------------------------------------------------------------
# status


def _loads(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _info(mv: ModelVersion, al: dict[str, str]) -> dict[str, Any]:
    t = mv.tags
    gate = _loads(t.get("gate")) or {}
    return {
        "version": str(mv.version),
        "dt": t.get("dt"),
        "aliases": sorted(a for a, v in al.items() if v == str(mv.version)),
        "created_ms": mv.creation_timestamp,
        "parent_version": t.get("parent_version") or None,
        "sid_version": t.get("sid_version") or None,
        "data_versions": _loads(t.get("data_versions")),
        "data_snapshot": t.get("data_snapshot"),
        "lineage": _loads(t.get("lineage")),
        "git_sha": t.get("git_sha"),
        "config_hash": t.get("config_hash"),
        "metrics": _loads(t.get("metrics")),
        "gate": {
            "passed": t.get("gate_passed"),
            "passed_raw": t.get("gate_passed_raw"),
            "mode": t.get("gate_mode"),
            "failed_checks": [c["metric"] + ":" + c["kind"] for c in gate.get("checks", []) if not c["passed"]],
        },
        "promoted_at": t.get("promoted_at"),
        "promoted_by": t.get("promoted_by"),
        "promote_forced": t.get("promote_forced"),
        "promote_reason": t.get("promote_reason"),
        "rolled_back": t.get("rolled_back") == "true",
    }


def status(cfg: Config) -> dict[str, Any]:
    """Champion/challenger/previous with lineage, metrics and gate verdicts, and what is pending.

    ``pending``: versions newer than the champion that were never promoted nor rolled back.
    """
    c, name = tracking.client(cfg), cfg.registry.model_name
    al = _aliases(c, name)
    versions = _versions(c, name) if al or c.search_registered_models(f"name = '{name}'") else []
    by_v = {str(v.version): v for v in versions}
    out: dict[str, Any] = {"model": name, "aliases": al, "versions": len(versions)}
    for alias in (CHAMPION, CHALLENGER, PREVIOUS):
        v = al.get(alias)
        out[alias] = _info(by_v[v], al) if v in by_v else None
    floor = int(al[CHAMPION]) if CHAMPION in al else 0
    out["pending"] = [
        _info(v, al) for v in versions
        if int(v.version) > floor and "promoted_at" not in v.tags and v.tags.get("rolled_back") != "true"
    ]
    return out
