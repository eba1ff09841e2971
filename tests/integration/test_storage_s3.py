"""The storage layer and the landing marker against a real S3-compatible server (moto, 127.0.0.1).

Every Python-side artefact path (landing + marker, SID codebooks + CURRENT, Think-Ahead exports,
run records) is exercised on ``s3a://`` URIs through ``onerec_prod.storage``; the test also checks
that nothing landed under the local var root meanwhile (no silent fallback to local disk).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.s3server import s3_environment

pytestmark = pytest.mark.timeout(300)
BUCKET = "onerec-lake"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_environment(tmp_path_factory.mktemp("moto") / "moto.log", BUCKET) as srv:
        yield srv


@pytest.fixture
def s3_cfg(s3, make_cfg, tmp_path):
    """A test config whose every artefact root is on the S3 server (the var root stays local)."""
    prefix = f"s3a://{BUCKET}/{tmp_path.name}"
    roots = [f"paths.{k}_root={prefix}/{k}" for k in ("lake", "raw", "artifacts", "runs", "models")]
    # MLflow speaks s3:// (not s3a://); its tracking database stays a local sqlite file here
    return make_cfg(*roots, f"registry.artifact_location=s3://{BUCKET}/{tmp_path.name}/mlflow", *s3.overrides())


# what may exist under the local var root in object-store mode: MLflow's sqlite tracking database
# (a tracking server in the cluster) and its lock files
LOCAL_ALLOWED = ("mlflow.db", "locks/")


def written_locally(var_root: str | Path) -> list[str]:
    """Files under the local var root that are not on the allow-list (must be [] in S3 mode)."""
    root = Path(var_root)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return [f for f in files if not f.startswith(LOCAL_ALLOWED)]


def test_storage_layer_roundtrip_on_s3_and_local(s3, s3_cfg, tmp_path):
    from onerec_prod import storage

    st = storage.storage(s3_cfg)
    for base in (f"s3a://{BUCKET}/rt-{tmp_path.name}", str(tmp_path / "local")):
        f = storage.join(base, "a", "b.txt")
        assert not st.exists(f)
        st.write_text(f, "one")
        st.write_text(f, "two")  # atomic replace
        assert st.read_text(f) == "two" and st.exists(f) and st.listdir(storage.join(base, "a")) == ["b.txt"]
        src = tmp_path / "src"
        (src / "d").mkdir(parents=True, exist_ok=True)
        (src / "d" / "x.bin").write_bytes(b"\x00\x01")
        st.put_dir(src, storage.join(base, "tree"))
        got = st.get_dir(storage.join(base, "tree"), tmp_path / f"got-{storage.scheme(base) or 'local'}")
        assert (got / "d" / "x.bin").read_bytes() == b"\x00\x01"
        st.rm(f)
        assert not st.exists(f)
    # s3:// and s3a:// name the same object
    assert st.read_bytes(f"s3://{BUCKET}/rt-{tmp_path.name}/tree/d/x.bin") == b"\x00\x01"
    assert f"rt-{tmp_path.name}/tree/d/x.bin" in s3.keys(BUCKET)


def test_replay_lands_on_s3_with_the_marker_last_and_the_sensor_checks_it(s3, s3_cfg, beauty_slice, tmp_path):
    from onerec_prod import storage
    from onerec_prod.pipeline import landing_missing, run_stage
    from onerec_prod.replay import MARKER_FILE, PART_FILE, replay

    day = "2014-02-25"
    assert len(landing_missing(s3_cfg, day)) == 2  # nothing landed yet
    summary = replay(s3_cfg, day, 1, dataset=beauty_slice, bootstrap_before=None)
    assert summary["raw_root"].startswith("s3a://")
    st = storage.storage(s3_cfg)
    part = storage.join(s3_cfg.paths.raw, "events", f"dt={day}")
    marker = json.loads(st.read_text(storage.join(part, MARKER_FILE)))
    lines = st.read_text(storage.join(part, PART_FILE)).splitlines()
    assert marker["files"][PART_FILE]["lines"] == len(lines) == summary["partitions"][0]["events"] > 0
    assert landing_missing(s3_cfg, day) == []
    assert run_stage("landing", day, s3_cfg)["files"] == 2
    # the run record went to the object store too
    assert st.exists(storage.join(s3_cfg.paths.runs, f"dt={day}", "landing.json"))

    # a partition whose data file no longer matches its marker is not complete
    st.write_text(storage.join(part, PART_FILE), "\n".join(lines[:-1]) + "\n")
    assert any("bytes" in m for m in landing_missing(s3_cfg, day))
    # data without a marker (a producer still writing) is not complete either
    st.rm(storage.join(part, MARKER_FILE))
    assert any("no _SUCCESS marker" in m for m in landing_missing(s3_cfg, day))
    # a rerun of replay makes it whole again
    replay(s3_cfg, day, 1, dataset=beauty_slice, bootstrap_before=None)
    assert landing_missing(s3_cfg, day) == []
    keys = s3.keys(BUCKET)
    assert f"{tmp_path.name}/raw/items/dt={day}/{MARKER_FILE}" in keys
    assert written_locally(s3_cfg.paths.var_root) == []
    assert any(k.startswith(f"{tmp_path.name}/mlflow/") for k in keys)  # the stage run's artefacts


def test_sid_codebooks_and_exports_live_on_s3(s3, s3_cfg, beauty_items, monkeypatch):
    import numpy as np

    from onerec_prod import storage
    from onerec_prod.serving.precompute import (
        UserPrefixes,
        export_root,
        latest_export,
        read_export,
        write_export,
    )
    from onerec_prod.sid import embed as sid_embed
    from onerec_prod.sid.service import current_version, ensure_sids, load_codebook, sid_root

    cfg = s3_cfg.model_copy(update={"sid": s3_cfg.sid.model_copy(update={"codebook_size": 16, "collision_size": 16})})
    rng = np.random.default_rng(0)
    vecs = {it["item_id"]: v / np.linalg.norm(v) for it, v in
            zip(beauty_items, rng.standard_normal((len(beauty_items), 32)).astype("float32"))}
    # the SID logic is tested with the real encoder elsewhere; here the vectors only need to exist
    monkeypatch.setattr(sid_embed, "embed_items", lambda rows, _c: np.stack([vecs[r["item_id"]] for r in rows]))
    rows = [{**it, "description": None, "sid": None, "sid_version": None} for it in beauty_items[:200]]
    mapping, version = ensure_sids(cfg, rows)
    assert str(sid_root(cfg)).startswith("s3a://") and current_version(cfg) == version
    cb = load_codebook(cfg)
    assert cb.version == version and len(set(mapping.values())) == 200
    st = storage.storage(cfg)
    assert st.exists(storage.join(sid_root(cfg), version, "manifest.json"))

    root = export_root(cfg)
    assert str(root).startswith("s3a://")
    items = [{"item_id": k, "title": "t", "categories": "c", "sid": v} for k, v in list(mapping.items())[:5]]
    rows_ = [UserPrefixes("u1", ("a", "b"), None, (((1, 2), -0.5),))]
    out = write_export(root, model_version="3", dt="2014-02-25", sid_version=version, rows=rows_, items=items,
                       settings={"levels": 2})
    path, manifest = latest_export(root, model_version="3")
    assert path == out and manifest["counts"] == {"users": 1, "items": 5}
    exp = read_export(path)
    assert exp.users["u1"].prefixes == (((1, 2), -0.5),) and len(exp.items) == 5
    assert written_locally(cfg.paths.var_root) == []


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_data_plane_writes_delta_tables_on_s3a(s3, s3_cfg, beauty_slice, tmp_path):
    """replay -> landing -> update_catalog -> ingest_events -> build_sequences with every root on
    the S3 server: Spark (hadoop-aws from Maven via spark.jars.packages) writes the Delta tables
    over s3a://, in a process of its own (its own JVM with the s3a settings)."""
    import subprocess
    import sys

    from onerec_prod.replay import replay

    day = "2014-02-25"
    replay(s3_cfg, day, 1, dataset=beauty_slice, bootstrap_before=None)
    sets = [a for o in [f"paths.var_root={s3_cfg.paths.var_root}", "data.assign_sids=false",
                        f"paths.dataset_dir={beauty_slice}",
                        *(f"paths.{k}_root={getattr(s3_cfg.paths, k + '_root')}"
                          for k in ("lake", "raw", "artifacts", "runs", "models")),
                        f"registry.artifact_location={s3_cfg.registry.artifact_location}", *s3.overrides()]
            for a in ("--set", o)]
    cmd = [sys.executable, "-m", "onerec_prod.cli", "--config", "configs/test.yaml", *sets, "run-day",
           "--date", day, "--stage", "landing", "--stage", "update_catalog", "--stage", "ingest_events",
           "--stage", "build_sequences"]
    res = subprocess.run(cmd, env={**os.environ, **s3.env()}, capture_output=True, text=True, timeout=1700,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr[-4000:]
    keys = s3.keys(BUCKET)
    for table in ("catalog", "events", "user_history"):
        assert f"{tmp_path.name}/lake/{table}/_delta_log/00000000000000000000.json" in keys, table
    from onerec_prod import storage

    rec = json.loads(storage.storage(s3_cfg).read_text(
        storage.join(s3_cfg.paths.runs, f"dt={day}", "ingest_events.json")))
    assert rec["counts"] and all(v is not None for v in rec["written_versions"].values())
    print("S3 keys written:", len(keys), "; Delta tables:",
          sorted({k.split("/")[2] for k in keys if k.startswith(f"{tmp_path.name}/lake/")}))
    assert written_locally(s3_cfg.paths.var_root) == []


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_whole_day_on_the_object_store(s3, make_cfg, beauty_slice, tmp_path):
    """One whole day (replay -> data plane -> SIDs -> train -> RL -> eval -> gate -> register ->
    promote -> precompute -> serve) with the lake, landing, artefacts, run records and MLflow
    artefacts on the S3 server. Model checkpoints go to a POSIX directory outside the var root (the
    cluster's ReadWriteMany volume); under the var root only MLflow's sqlite file, its locks and the
    champion's download cache may appear."""
    import subprocess
    import sys

    import httpx

    from onerec_prod import storage
    from onerec_prod.replay import replay

    day = "2014-02-28"
    prefix = f"s3a://{BUCKET}/{tmp_path.name}"
    over = [*(f"paths.{k}_root={prefix}/{k}" for k in ("lake", "raw", "artifacts", "runs")),
            f"paths.models_root={tmp_path / 'shared' / 'models'}",
            f"registry.artifact_location=s3://{BUCKET}/{tmp_path.name}/mlflow", *s3.overrides(),
            "sid.codebook_size=64", "sid.collision_size=64", "train.max_steps=2", "grpo.steps=1",
            "eval.max_users=10", "eval.bertscore_items=2", "eval.sasrec_epochs=1", "serving.active_days=0",
            "gate.mode=dry_run"]  # a 2-step model cannot beat MostPop; this test is about storage, not the gate
    var = tmp_path / "var"
    cfg = make_cfg(*over, root=var)
    # 02-24..28 land as one bootstrap partition dated 2014-02-28 (the first model comes from scratch)
    replay(cfg, "2014-03-01", 1, dataset=beauty_slice, bootstrap_before="2014-03-01")
    sets = [a for o in [f"paths.var_root={var}", f"paths.dataset_dir={beauty_slice}", *over] for a in ("--set", o)]
    res = subprocess.run([sys.executable, "-m", "onerec_prod.cli", "--config", "configs/test.yaml", *sets,
                          "run-day", "--date", day], env={**os.environ, **s3.env()}, capture_output=True,
                         text=True, timeout=3300, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr[-5000:]

    keys = s3.keys(BUCKET)
    mine = [k for k in keys if k.startswith(f"{tmp_path.name}/")]
    tables = sorted({k.split("/")[2] for k in mine if k.split("/")[1] == "lake" and "/_delta_log/" in k})
    print("Delta tables on S3:", tables)
    print("artifact URIs:", sorted({f"s3://{BUCKET}/" + "/".join(k.split("/")[:3]) for k in mine}))
    for t in ("catalog", "events", "user_history", "eval_snapshot", "samples"):
        assert t in tables, t
    st = storage.storage(cfg)
    from onerec_prod.sid.service import current_version

    assert current_version(cfg) and st.exists(storage.join(cfg.paths.artifacts, "sid", current_version(cfg)))
    gate = json.loads(st.read_text(storage.join(cfg.paths.runs, f"dt={day}", "gate_register.json")))
    promote = json.loads(st.read_text(storage.join(cfg.paths.runs, f"dt={day}", "promote.json")))
    print("gate:", {k: gate.get(k) for k in ("passed", "version")}, "promote:", promote)
    from onerec_prod.registry.registry import champion

    champ = champion(cfg)
    assert champ is not None and str(champ[0]) == str(promote["version"])
    from onerec_prod.serving.precompute import export_root, latest_export

    found = latest_export(export_root(cfg), model_version=str(champ[0]))
    assert found is not None and str(found[0]).startswith("s3a://")

    from onerec_prod.serving.service import background_server, create_app

    user = next(iter(__import__("onerec_prod.serving.precompute", fromlist=["read_export"])
                     .read_export(found[0]).users))
    with background_server(create_app(cfg, follow_champion=False)) as url, httpx.Client(base_url=url, timeout=60) as c:
        import time

        for _ in range(600):
            h = c.get("/healthz")
            if h.status_code == 200:
                break
            time.sleep(1)
        assert h.status_code == 200, h.text
        r = c.post("/recommend", json={"user_id": user})
        assert r.status_code == 200, r.text
        print("serving answer:", r.json())
        assert r.json()["path"] == "prefix" and r.json()["items"]
    assert [f for f in written_locally(var) if not f.startswith("cache/models/")] == []
