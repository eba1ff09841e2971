"""The registry, gate and aliases on a real MLflow sqlite store (one fresh store per test).

Each test copies a session-wide, already-migrated empty ``mlflow.db`` into its own tmp
``var`` (MLflow's schema migration costs seconds; copying costs nothing).

The "model" is a tiny two-tower scorer in safetensors: item embeddings ``W`` and user
embeddings ``U``; Recall@10 / NDCG@10 are computed from it on a fixed synthetic snapshot, so the
degraded candidate really is the champion's weights perturbed by noise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
N_USERS, N_ITEMS, DIM = 64, 200, 16


# --------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite file with every table created, and nothing else."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def cfg_for(tmp_path, make_cfg, empty_store):
    """``cfg_for(*overrides)`` -> a Config whose store starts as a copy of the empty store."""

    def _make(*overrides: str):
        (tmp_path / "mlflow.db").exists() or shutil.copyfile(empty_store, tmp_path / "mlflow.db")
        return make_cfg(*overrides)

    return _make


@pytest.fixture
def cfg(cfg_for):
    return cfg_for()


@pytest.fixture(scope="session")
def snapshot():
    """A frozen eval snapshot: user vectors and each user's held-out target item."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    u = rng.normal(size=(N_USERS, DIM)).astype(np.float32)
    targets = np.argmax(u @ w.T, axis=1)  # the true model ranks every target first
    return w, u, targets


def save_model(path: Path, w: np.ndarray, dt: str, parent: str | None = None) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({"item_emb": w}, str(path / "model.safetensors"))
    meta = {"sid_version": "sid-v1", "parent": parent, "dt": dt, "stage": "sft",
            "data_versions": {"events": 3, "items": 2}}
    (path / "onerec_meta.json").write_text(json.dumps(meta))
    return path


def per_user(model_dir: Path, snapshot) -> dict[str, list[float]]:
    """Each user's hit and NDCG gain at 10 (the eval report's ``per_user`` block)."""
    from safetensors.numpy import load_file

    _, u, targets = snapshot
    w = load_file(str(model_dir / "model.safetensors"))["item_emb"]
    scores = u @ w.T
    rank = (scores > scores[np.arange(len(u)), targets][:, None]).sum(axis=1)  # 0 = best
    hit = rank < 10
    ndcg = np.where(hit, 1.0 / np.log2(rank + 2), 0.0)
    return {"recall@10": hit.astype(float).tolist(), "ndcg@10": ndcg.tolist()}


def evaluate(model_dir: Path, snapshot) -> dict[str, float]:
    """Recall@10 / NDCG@10 of a model dir on the snapshot, plus a fixed caption score."""
    g = per_user(model_dir, snapshot)
    return {"recall@10": float(np.mean(g["recall@10"])), "ndcg@10": float(np.mean(g["ndcg@10"])),
            "bertscore_f1": 0.85}


def mostpop(snapshot) -> dict[str, float]:
    """MostPop on the same users: the 10 most frequent targets, for everyone."""
    _, _, targets = snapshot
    values, counts = np.unique(targets, return_counts=True)
    top = set(values[np.argsort(-counts, kind="stable")[:10]].tolist())
    hit = np.array([t in top for t in targets], dtype=float)
    return {"recall@10": float(hit.mean()), "ndcg@10": 0.5 * float(hit.mean())}  # as if every hit sat at rank 3


def gated(cfg, tmp_path, snapshot, dt, w, champion_dir=None, parent=None):
    """Save, evaluate (with the champion on the same snapshot) and gate a model; returns the result."""
    from onerec_prod.registry.release import gate_and_register, lineage_from_model

    d = save_model(tmp_path / f"cand-{dt}", w, dt, parent)
    report = {"metrics": evaluate(d, snapshot), "per_user": per_user(d, snapshot), "snapshot": dt,
              "baselines": {"mostpop": mostpop(snapshot)}}
    if champion_dir is not None:  # as the pipeline's evaluate stage: metrics and the version compared
        from onerec_prod.registry import registry

        report["champion_metrics"] = evaluate(champion_dir, snapshot)
        report["champion_per_user"] = per_user(champion_dir, snapshot)
        report["champion_version"] = registry.aliases(cfg).get("champion")
    return gate_and_register(cfg, dt, d, report, lineage_from_model(d) | {"data_snapshot": dt})


def mlflow_client(cfg):
    from onerec_prod.registry.tracking import client

    return client(cfg)


# --------------------------------------------------------------------------------------
# tests


def test_degraded_candidate_is_not_promoted_and_champion_stays(cfg, tmp_path, snapshot):
    from onerec_prod.registry import registry

    w = snapshot[0]
    first = gated(cfg, tmp_path, snapshot, "2014-01-01", w)
    assert first["passed"] and first["challenger_set"] and first["champion_version"] is None
    registry.promote(cfg)  # the challenger
    champ_v, champ_dir = registry.champion(cfg)
    assert champ_v == first["version"]

    noisy = w + np.random.default_rng(1).normal(scale=1.5, size=w.shape).astype(np.float32)
    out = gated(cfg, tmp_path, snapshot, "2014-01-02", noisy, champion_dir=champ_dir, parent=champ_v)

    # recall really dropped, beyond the noise of the paired test on the same users
    reg = {(c["metric"], c["kind"]): c for c in out["gate"]["checks"]}[("recall@10", "paired")]
    assert reg["champion_value"] == 1.0 and reg["high"] < 0 and reg["n"] == N_USERS
    assert not out["passed"] and not out["passed_effective"] and not out["challenger_set"]
    assert "gate FAILED" in out["table"]

    # the verdict is on the version and in the day's gate run, check by check
    c = mlflow_client(cfg)
    mv = c.get_model_version(cfg.registry.model_name, out["version"])
    assert mv.tags["gate_passed"] == "false" and mv.tags["parent_version"] == champ_v
    gate_run = c.search_runs(
        [c.get_experiment_by_name(cfg.registry.experiment).experiment_id],
        "tags.step = 'gate' and tags.dt = '2014-01-02'",
    )[0]
    m = gate_run.data.metrics
    assert m["gate/recall_at_10/paired/passed"] == 0.0
    assert m["gate/recall_at_10/paired/threshold"] == pytest.approx(0.0)
    assert m["gate/recall_at_10/baseline/passed"] == 1.0
    assert m["gate/recall_at_10/floor/passed"] == 1.0
    assert gate_run.data.tags["mlflow.parentRunId"]  # nested in the day run

    # no path promotes it without --force, and the champion stays
    with pytest.raises(registry.RegistryError, match="no challenger"):
        registry.promote(cfg)
    with pytest.raises(registry.GateNotPassedError, match="gate did not pass"):
        registry.promote(cfg, out["version"])
    assert registry.aliases(cfg) == {"champion": champ_v}
    st = registry.status(cfg)
    assert st["champion"]["version"] == champ_v
    assert [p["version"] for p in st["pending"]] == [out["version"]]
    assert "recall@10:paired" in st["pending"][0]["gate"]["failed_checks"]


def test_promote_then_rollback_restores_exact_previous(cfg, tmp_path, snapshot):
    from onerec_prod.registry import registry

    w = snapshot[0]
    v1 = gated(cfg, tmp_path, snapshot, "2014-01-01", w)["version"]
    registry.promote(cfg)
    v1_dir = registry.champion(cfg)[1]
    better = w.copy()
    better[0] += 1e-3  # a different (equally good) model
    v2 = gated(cfg, tmp_path, snapshot, "2014-01-02", better, champion_dir=v1_dir, parent=v1)
    assert v2["passed"] and v2["challenger_set"]

    out = registry.promote(cfg)
    assert out == {"champion": v2["version"], "previous": v1, "changed": True, "forced": False,
                   "actor": out["actor"], "reason": None}
    assert registry.aliases(cfg) == {"champion": v2["version"], "previous": v1}  # challenger consumed
    assert registry.promote(cfg, v2["version"])["changed"] is False  # re-promote is a no-op

    rb = registry.rollback(cfg)
    assert rb == {"champion": v1, "rolled_back": v2["version"], "previous": None, "changed": True}
    assert registry.aliases(cfg) == {"champion": v1}
    version, local = registry.champion(cfg)
    assert version == v1
    # the exact tensors of version 1 as it was trained, not of the cache dir compared with itself
    assert registry.weights_hash(local) == registry.weights_hash(tmp_path / "cand-2014-01-01")
    assert registry.weights_hash(local) != registry.weights_hash(tmp_path / "cand-2014-01-02")

    with pytest.raises(registry.RegistryError, match="no previous"):
        registry.rollback(cfg)  # no flip-flop back to the bad version
    with pytest.raises(registry.GateNotPassedError, match="rolled back"):
        registry.promote(cfg, v2["version"])
    st = registry.status(cfg)
    assert st["pending"] == [] and st["champion"]["version"] == v1

    # resolve_model_dir: alias, number, local dir
    assert registry.resolve_model_dir(cfg, "models:/onerec@champion") == local
    assert registry.weights_hash(registry.resolve_model_dir(cfg, f"models:/onerec/{v2['version']}")) == \
        registry.weights_hash(tmp_path / "cand-2014-01-02")
    assert registry.resolve_model_dir(cfg, tmp_path / "cand-2014-01-01") == tmp_path / "cand-2014-01-01"
    with pytest.raises(registry.RegistryError, match="no alias 'challenger'"):
        registry.resolve_model_dir(cfg, "models:/onerec@challenger")


def test_registry_failure_windows(cfg, tmp_path, snapshot, monkeypatch):
    """Faults injected into the registry's windows: a rollback that dies before moving the alias,
    a gate or promote against a champion that moved, a tampered cache, a version without a hash."""
    from mlflow import MlflowClient

    from onerec_prod.registry import registry

    w = snapshot[0]
    v1 = gated(cfg, tmp_path, snapshot, "2014-01-01", w)["version"]
    registry.promote(cfg)
    w2 = w.copy()
    w2[0] += 1e-3
    v2 = gated(cfg, tmp_path, snapshot, "2014-01-02", w2, champion_dir=registry.champion(cfg)[1])["version"]
    registry.promote(cfg)

    # 1. rollback killed between its writes: the bad version is already marked, champion unmoved
    real = MlflowClient.set_registered_model_alias

    def dies(self, *a, **kw):
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", dies)
    with pytest.raises(ConnectionError):
        registry.rollback(cfg)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    assert registry.aliases(cfg)["champion"] == v2
    assert mlflow_client(cfg).get_model_version("onerec", v2).tags["rolled_back"] == "true"
    with pytest.raises(registry.GateNotPassedError, match="rolled back"):
        registry.promote(cfg, v2)  # marked: nothing re-promotes it by accident
    assert registry.rollback(cfg)["champion"] == v1  # the rerun finishes the rollback

    # 2. the gate refuses metrics of a champion that is no longer champion
    w3 = w.copy()
    w3[1] += 1e-3
    d3 = save_model(tmp_path / "cand-2014-01-03", w3, "2014-01-03")
    report = {"metrics": evaluate(d3, snapshot), "champion_metrics": evaluate(d3, snapshot),
              "champion_version": v2}
    from onerec_prod.registry.release import gate_and_register, lineage_from_model

    with pytest.raises(registry.RegistryError, match=f"champion version {v2}, but the champion is now {v1}"):
        gate_and_register(cfg, "2014-01-03", d3, report, lineage_from_model(d3))

    # 3. a challenger gated against v1 is not promoted once the champion moved to another version
    v3 = gated(cfg, tmp_path, snapshot, "2014-01-03", w3, champion_dir=registry.champion(cfg)[1])
    assert v3["challenger_set"] and v3["champion_version"] == v1
    registry.promote(cfg, v2, force=True, reason="operator override")
    with pytest.raises(registry.GateNotPassedError, match=f"gated against champion {v1}"):
        registry.promote(cfg)
    registry.promote(cfg, v1, force=True, reason="back")
    assert registry.promote(cfg)["champion"] == v3["version"]  # against the champion it was gated on

    # 4. the download cache is re-verified on every load
    cached = registry.version_dir(cfg, v1)
    from safetensors.numpy import save_file

    save_file({"item_emb": w3}, str(cached / "model.safetensors"))  # a tampered cache entry
    again = registry.version_dir(cfg, v1)
    assert registry.weights_hash(again) == registry.weights_hash(tmp_path / "cand-2014-01-01")
    mlflow_client(cfg).delete_model_version_tag("onerec", v1, "weights_hash")
    with pytest.raises(registry.RegistryError, match="no weights_hash tag"):
        registry.version_dir(cfg, v1)


def test_forced_promote_records_who_and_why_via_cli(cfg, tmp_path, snapshot, capsys):
    from onerec_prod import cli
    from onerec_prod.registry import registry

    w = snapshot[0]
    v1 = gated(cfg, tmp_path, snapshot, "2014-01-01", w)["version"]
    registry.promote(cfg)
    noisy = w + np.random.default_rng(2).normal(scale=2.0, size=w.shape).astype(np.float32)
    v2 = gated(cfg, tmp_path, snapshot, "2014-01-02", noisy, champion_dir=registry.champion(cfg)[1])
    assert not v2["passed"]

    base = ["--config", str(REPO / "configs" / "test.yaml"), "--set", f"paths.var_root={cfg.paths.var}",
            "--set", f"paths.dataset_dir={cfg.paths.dataset}"]
    assert cli.main(base + ["promote", "--version", v2["version"]]) == 1
    assert "gate did not pass" in capsys.readouterr().err
    assert cli.main(base + ["promote", "--version", v2["version"], "--force"]) == 1
    assert "needs a reason" in capsys.readouterr().err
    assert registry.aliases(cfg) == {"champion": v1}

    rc = cli.main(base + ["promote", "--version", v2["version"], "--force",
                          "--reason", "hotfix INC-42", "--actor", "alice"])
    assert rc == 0 and "FORCED by alice: hotfix INC-42" in capsys.readouterr().out
    tags = mlflow_client(cfg).get_model_version(cfg.registry.model_name, v2["version"]).tags
    assert (tags["promote_forced"], tags["promoted_by"], tags["promote_reason"]) == ("true", "alice", "hotfix INC-42")
    assert tags["promoted_at"].startswith("20")
    assert registry.aliases(cfg) == {"champion": v2["version"], "previous": v1}

    assert cli.main(base + ["status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["champion"]["promote_reason"] == "hotfix INC-42" and st["previous"]["version"] == v1
    assert st["champion"]["lineage"]["sid_version"] == "sid-v1"
    assert st["champion"]["data_versions"] == {"events": 3, "items": 2}
    assert cli.main(base + ["status"]) == 0
    assert "FORCED: hotfix INC-42" in capsys.readouterr().out
    assert cli.main(base + ["rollback"]) == 0
    assert registry.aliases(cfg) == {"champion": v1}


def test_gate_cli_dry_run_does_not_block(cfg_for, tmp_path, snapshot, capsys):
    from onerec_prod import cli
    from onerec_prod.registry import registry

    cfg = cfg_for("gate.mode=dry_run", "gate.floors={recall@10: 1.5}")
    d = save_model(tmp_path / "m", snapshot[0], "2014-01-01")
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"metrics": evaluate(d, snapshot)}))
    args = ["--config", str(REPO / "configs" / "test.yaml"), "--set", f"paths.var_root={cfg.paths.var}",
            "--set", "gate.mode=dry_run", "--set", "gate.floors={recall@10: 1.5}",
            "gate", "--date", "2014-01-01", "--model", str(d), "--report", str(report)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "gate FAILED (dry_run: not blocking)" in out and "challenger set to this version" in out
    assert registry.aliases(cfg) == {"challenger": "1"}
    assert registry.promote(cfg)["champion"] == "1"
    assert cli.main(args) == 0  # rerun of the same day and weights: the same version
    assert "version 1 (dt=2014-01-01)" in capsys.readouterr().out


def test_tracking_one_run_per_day_and_step_reruns_replace(cfg, tmp_path):
    from onerec_prod.registry import registry, tracking

    with tracking.day_run(cfg, "2014-01-05") as day:
        first = tracking.log_step(cfg, "2014-01-05", "ingest_events", params={"delta_version": 3},
                                  metrics={"rows": 100}, artifacts={"counts": {"rows": 100}})
    with tracking.day_run(cfg, "2014-01-05") as again:
        second = tracking.log_step(cfg, "2014-01-05", "ingest_events", params={"delta_version": 4},
                                   metrics={"rows": 120}, artifacts={"counts": {"rows": 120}})
    assert day.run_id == again.run_id and first == second
    c = mlflow_client(cfg)
    run = c.get_run(first)
    assert run.data.metrics["rows"] == 120  # the rerun's value is the latest
    assert [m.value for m in c.get_metric_history(first, "rows")] == [100, 120]
    assert run.data.params["delta_version"] == "3" and run.data.tags["param.delta_version"] == "4"
    assert json.loads(Path(c.download_artifacts(first, "counts.json", str(tmp_path))).read_text()) == {"rows": 120}
    parent = c.get_run(day.run_id)
    assert parent.info.run_name == "day-2014-01-05" and parent.info.status == "FINISHED"
    assert parent.data.tags["config_hash"] == cfg.digest() and parent.data.tags["git_sha"]
    exp = c.get_experiment_by_name(cfg.registry.experiment)
    assert len(c.search_runs([exp.experiment_id], "tags.run_kind = 'day'")) == 1
    assert exp.artifact_location.startswith("file://")

    # register: same dt and weights -> same version; new weights -> a new version
    w = np.ones((4, 4), np.float32)
    d = save_model(tmp_path / "m", w, "2014-01-05")
    v = registry.register(cfg, d, "2014-01-05", {"parent_version": None})
    assert registry.register(cfg, d, "2014-01-05", {}) == v
    d2 = save_model(tmp_path / "m2", w * 2, "2014-01-05")
    assert registry.register(cfg, d2, "2014-01-05", {}) != v


WORKER = textwrap.dedent(
    """
    import contextlib, json, logging, os, sys, time
    from pathlib import Path
    from onerec_prod.config import load_config
    from onerec_prod.registry import registry
    version, other, go, rounds = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    clock = time.time_ns  # CLOCK_REALTIME: one clock for both processes of this machine
    trace, i = [], 0

    class Waits(logging.Handler):  # the registry logs each holder it finds (extra lock_wait)
        def emit(self, record):
            if getattr(record, "lock_wait", None):
                trace.append(["wait", clock(), record.lock_wait])
                Path(f"{go}{i}.waiting-{version}").touch()

    logging.getLogger("onerec_prod.registry").addHandler(Waits())
    logging.getLogger("onerec_prod.registry").setLevel(logging.INFO)
    real_lock = registry.alias_lock

    @contextlib.contextmanager
    def traced_lock(cfg):
        trace.append(["attempt", clock()])
        with real_lock(cfg):
            trace.append(["enter", clock()])
            try:
                # hold the lock until the other promoter has found it held (or is done): the two
                # critical sections are attempted at the same time, not one after the other
                t0 = time.monotonic()
                while time.monotonic() - t0 < 60 and not any(
                        Path(f"{go}{i}.{s}-{other}").exists() for s in ("waiting", "done")):
                    time.sleep(0.01)
                yield
            finally:
                trace.append(["exit", clock()])

    registry.alias_lock = traced_lock
    for i, (var, overrides) in enumerate(rounds):
        trace = []
        cfg = load_config("configs/test.yaml", [f"paths.var_root={var}", *overrides], environ={})
        registry.aliases(cfg)  # warm the store before the start line
        Path(f"{go}{i}.ready-{version}").touch()
        while not Path(f"{go}{i}").exists():
            time.sleep(0.01)
        try:
            out = registry.promote(cfg, version, actor=f"worker-{version}")
        except registry.GateNotPassedError as e:  # gated against a champion that has since moved
            out = {"refused": str(e)}
        Path(f"{go}{i}.done-{version}").touch()
        print(json.dumps({"out": out, "trace": trace, "pid": os.getpid()}), flush=True)
    """
)

LOCK_BUCKET = "onerec-locks"


@pytest.fixture(scope="module")
def s3lock(tmp_path_factory):
    """A real S3 server (moto, 127.0.0.1, one request at a time as S3's conditional writes are
    atomic) with a lock bucket; its credentials in the environment while the module runs."""
    from tests.s3server import s3_environment

    with s3_environment(tmp_path_factory.mktemp("moto") / "moto.log", LOCK_BUCKET, serial=True) as srv:
        yield srv


def object_lock_overrides(srv, prefix: str) -> list[str]:
    return ["registry.lock=object", f"registry.lock_uri=s3://{LOCK_BUCKET}/{prefix}",
            "registry.lock_timeout_s=120", *srv.overrides()]


def test_concurrent_promotes_overlap_and_exactly_one_holds_the_lock(tmp_path, make_cfg, empty_store, snapshot, s3lock):
    """Two processes promote two versions at the same instant, once per lock kind: ``file``
    (flock, one machine) and ``object`` (conditional writes on a real S3 server, the cluster's).

    Each process records, on the machine's wall clock, when it asked for the lock, when it found
    it held (the registry logs the holder), when it entered and left; the holder keeps the lock
    until the other has found it held, so both critical sections provably overlap in time.
    """
    from onerec_prod.registry import registry

    w, rounds = snapshot[0], []
    for lock in ("file", "object"):
        root = tmp_path / lock
        root.mkdir()
        shutil.copyfile(empty_store, root / "mlflow.db")
        overrides = ["registry.lock=file"] if lock == "file" else object_lock_overrides(s3lock, tmp_path.name)
        cfg = make_cfg(*overrides, root=root)
        v1 = gated(cfg, root, snapshot, "2014-01-01", w)["version"]
        registry.promote(cfg)
        champ_dir = registry.champion(cfg)[1]
        others = []
        for i, dt in enumerate(["2014-01-02", "2014-01-03"]):
            wi = w.copy()
            wi[0] += 1e-3 * (i + 1)
            others.append(gated(cfg, root, snapshot, dt, wi, champion_dir=champ_dir)["version"])
        rounds.append((cfg, lock, overrides, v1, others))
    assert rounds[0][4] == rounds[1][4] == ["2", "3"]

    go = tmp_path / "go"
    spec = json.dumps([[str(c.paths.var), ov] for c, _, ov, _, _ in rounds])
    procs = {
        v: subprocess.Popen([sys.executable, "-c", WORKER, v, other, str(go), spec], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for v, other in (("2", "3"), ("3", "2"))
    }
    deadline = time.monotonic() + 180
    for i in range(len(rounds)):
        while not all(Path(f"{go}{i}.ready-{v}").exists() for v in procs):
            dead = [p for p in procs.values() if p.poll() is not None]
            assert not dead and time.monotonic() < deadline, dead and dead[0].stderr.read()
            time.sleep(0.02)
        Path(f"{go}{i}").touch()  # both start promoting at once
    results = {}
    for v, p in procs.items():
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        results[v] = [json.loads(line) for line in out.strip().splitlines()]

    for i, (cfg, lock, _, v1, others) in enumerate(rounds):
        ev = {v: {kind: rest for kind, *rest in results[v][i]["trace"]} for v in others}
        first, second = sorted(others, key=lambda v: ev[v]["enter"][0])
        a, b = ev[first], ev[second]
        # both asked for the lock before either left it: the critical sections overlap in time ...
        assert max(a["attempt"][0], b["attempt"][0]) < min(a["exit"][0], b["exit"][0]), (lock, ev)
        # ... the second found it held while the first was inside, and entered only after it left
        assert "wait" in b and a["enter"][0] < b["wait"][0] < a["exit"][0], (lock, ev)
        assert a["exit"][0] < b["enter"][0], (lock, ev)
        if lock == "object":  # the lock object names its live holder (owner token, host, pid)
            assert f"pid {results[first][i]['pid']}" in b["wait"][1] and "owner " in b["wait"][1], b
            assert not [k for k in s3lock.keys(LOCK_BUCKET) if k.startswith(tmp_path.name)], "lock not released"

        al = registry.aliases(cfg)
        # exactly one champion (the first holder) and previous is the champion it replaced. Both were
        # gated against v1: once the first promote moved the champion, the second is refused (its
        # gate compared with a champion that no longer serves), never stacked on top
        assert al["champion"] == first and al.get("previous") == v1, (lock, al)
        assert results[first][i]["out"]["previous"] == v1, lock
        assert "gated against champion" in results[second][i]["out"]["refused"], (lock, results[second][i])
        assert registry.status(cfg)["champion"]["promoted_by"] == f"worker-{first}"
        assert registry.rollback(cfg)["champion"] == v1  # rollback lands on a real champion


def test_object_lock_stale_takeover_timeout_and_lost_lock(s3lock, caplog):
    """The object-store lock's failure cases on a real S3 server: a holder that died (stale lock,
    taken over by exactly one of two racing waiters, with a WARNING naming it), a live holder
    (the waiter times out with a message naming owner, host, pid and the object), and a holder
    that overran its TTL (its release finds another owner and raises ``LockLost``)."""
    import logging
    import os
    import socket
    import threading

    from onerec_prod.registry import locks

    c = locks.s3_client(s3lock.endpoint, "us-east-1", True)
    key = f"stale-{time.time_ns()}/registry-onerec.aliases.lock"

    def new(**kw):
        return locks.ObjectStoreLock(c, LOCK_BUCKET, key, **({"ttl_s": 60, "timeout_s": 60} | kw))

    # a holder killed inside its critical section, long ago (its ttl: 0 s)
    c.put_object(Bucket=LOCK_BUCKET, Key=key, IfNoneMatch="*", Body=json.dumps(
        {"owner": "dead-owner", "host": "node-7", "pid": 4242, "ttl_s": 0, "acquired_at": "earlier"}).encode())
    time.sleep(1.2)  # older than its ttl on the server's clock (1 s resolution)
    racers, won, errors = [new(timeout_s=1.5), new(timeout_s=1.5)], [], []
    barrier = threading.Barrier(2)

    def race(lk):
        barrier.wait()
        try:
            lk.acquire()
            won.append(lk)
        except locks.LockTimeout as e:
            errors.append(str(e))

    with caplog.at_level(logging.WARNING, logger="onerec_prod.registry.locks"):
        threads = [threading.Thread(target=race, args=(lk,)) for lk in racers]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert len(won) == 1 and len(errors) == 1, (won, errors)  # exactly one replaced the stale lock
    holder = won[0]
    stale_logs = [r.getMessage() for r in caplog.records if "STALE" in r.getMessage()]
    assert len(stale_logs) == 1 and "dead-owner" in stale_logs[0] and "node-7" in stale_logs[0], stale_logs
    # the loser waited on the live winner and names it
    assert holder.owner in errors[0] and f"pid {os.getpid()}" in errors[0] and socket.gethostname() in errors[0]
    assert f"s3://{LOCK_BUCKET}/{key}" in errors[0]
    assert holder.read().owner == holder.owner

    # the holder overran its ttl and another process took the lock over: release says so
    c.put_object(Bucket=LOCK_BUCKET, Key=key, Body=json.dumps(
        {"owner": "usurper", "host": "node-9", "pid": 99, "ttl_s": 60, "acquired_at": "now"}).encode())
    with pytest.raises(locks.LockLost, match="taken over while held.*usurper"):
        holder.release()
    assert new().read().owner == "usurper"  # the usurper's lock is left alone
    c.delete_object(Bucket=LOCK_BUCKET, Key=key)

    # free again: a clean hold leaves no object behind
    with new().held():
        assert s3lock.keys(LOCK_BUCKET).count(key) == 1
    assert key not in s3lock.keys(LOCK_BUCKET)


def test_auto_lock_mode(make_cfg):
    """``auto``: flock for a local store; the object lock for a remote server with an s3 lock root."""
    from onerec_prod.registry import tracking

    assert tracking.lock_mode(make_cfg()) == "file"
    remote = ["registry.tracking_uri=http://mlflow.onerec.svc:5000"]
    assert tracking.lock_mode(make_cfg(*remote, "paths.artifacts_root=s3a://onerec-lake/artifacts")) == "object"
    assert tracking.object_lock_root(make_cfg(*remote, "paths.artifacts_root=s3a://b/a")) == "s3a://b/a/locks"
    assert tracking.lock_mode(make_cfg(*remote)) == "file"  # one machine running `mlflow server`
    from onerec_prod.config import load_config

    cluster = load_config(REPO / "configs" / "cluster.yaml", environ={})  # what the pods run
    assert tracking.lock_mode(cluster) == "object"
    assert tracking.object_lock_root(cluster) == "s3a://onerec-lake/artifacts/locks"
