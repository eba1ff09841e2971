"""infra/: the cluster manifests validate offline and name only things that exist in the code.

- Core kinds (Deployment, Job, Service, ...) are validated against the Kubernetes 1.33 JSON
  schemas shipped with kubernetes-validate, in strict mode (unknown fields are errors).
- Custom resources (SparkApplication, PyTorchJob) have no schema there: their required fields
  and the pod specs inside them are checked here, the pod specs against the core Pod schema.
- Images, `onerec-prod` subcommands, `jobs/<name>.py` entry points, ONEREC__ / --set config keys,
  secrets and the cluster shape are cross-checked against the code and configs/cluster.yaml.
- The capacity arithmetic (infra/capacity.py) is checked on one row worked out by hand.

Templates under infra/k8s/templates/ carry Airflow's ``{{ ds }}`` / ``{{ ds_nodash }}``; they are
rendered with a fixed date before validation.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import re
import sys
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
HELM_VALUES = INFRA / "helm" / "airflow-values.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
CLUSTER_YAML = REPO / "configs" / "cluster.yaml"
K8S_VERSION = "1.33.0"
DS = "2025-01-02"
SPARK_JOBS = ("ingest_events", "update_catalog", "build_sequences", "build_eval_snapshot", "build_samples")
CUSTOM_KINDS = {"SparkApplication": "sparkoperator.k8s.io/v1beta2", "PyTorchJob": "kubeflow.org/v1",
                "ServiceMonitor": "monitoring.coreos.com/v1"}
INTERNAL_REGISTRY = "registry.internal/"
SECRETISH = re.compile(
    r"(PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|PRIVATE|API_KEY|ACCESS_KEY|_URI$|CONNECTION)", re.I
)


# --------------------------------------------------------------------------------------
# loading


def render(text: str) -> str:
    """Fill in the Airflow template variables the templates use; anything else is an error."""
    out = text.replace("{{ ds }}", DS).replace("{{ ds_nodash }}", DS.replace("-", ""))
    assert "{{" not in out, f"unknown template variable in: {re.findall(r'{{[^}]*}}', out)}"
    return out


@functools.lru_cache(maxsize=1)
def manifests() -> tuple[tuple[str, dict], ...]:
    """(relative path, document) for every Kubernetes object under infra/k8s."""
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(render(path.read_text())):
            if doc:
                out.append((str(path.relative_to(REPO)), doc))
    return tuple(out)


def docs_of(kind: str) -> list[dict]:
    return [d for _, d in manifests() if d["kind"] == kind]


def one(kind: str, name_prefix: str) -> dict:
    found = [d for d in docs_of(kind) if d["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"expected one {kind} named {name_prefix}*, found {len(found)}"
    return found[0]


@functools.lru_cache(maxsize=1)
def helm_values() -> dict:
    return yaml.safe_load(HELM_VALUES.read_text())


@functools.lru_cache(maxsize=1)
def cluster_cfg():
    from onerec_prod.config import load_config

    return load_config(CLUSTER_YAML, environ={})


def walk(node, path=()):
    """Yield (path, key, value) for every mapping entry in a nested structure."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, path + (i,))


def pod_specs(doc: dict) -> list[dict]:
    """Pod specs inside a workload, custom resources included."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "Pod":
        return [spec]
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "PyTorchJob":
        return [r["template"]["spec"] for r in spec["pytorchReplicaSpecs"].values()]
    return []


def containers() -> list[tuple[str, dict]]:
    out = []
    for path, doc in manifests():
        for ps in pod_specs(doc):
            for c in ps.get("initContainers", []) + ps["containers"]:
                out.append((f"{path}:{doc['metadata']['name']}/{c['name']}", c))
    return out


def env_entries() -> list[tuple[str, dict]]:
    """Every `env:` item in manifests (custom resources included) and in the Helm values."""
    out = []
    sources = [(p, d) for p, d in manifests()] + [(str(HELM_VALUES.relative_to(REPO)), helm_values())]
    for helm_extra in ("extraEnv",):
        text = helm_values().get(helm_extra)
        if text:
            sources.append((f"{HELM_VALUES.name}:{helm_extra}", {"env": yaml.safe_load(text)}))
    for where, doc in sources:
        for _, key, value in walk(doc):
            if key == "env" and isinstance(value, list):
                out += [(where, e) for e in value if isinstance(e, dict) and "name" in e]
    return out


def config_field_exists(dotted: str) -> bool:
    """True when ``group.key`` (any depth) names a field of onerec_prod.config.Config."""
    from pydantic import BaseModel

    from onerec_prod.config import Config

    model: type[BaseModel] = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:  # a leaf; dict-valued leaves (spark.extra_conf) take any sub-key
            return i == len(parts) - 1 or getattr(ann, "__origin__", None) is dict
    return False


# --------------------------------------------------------------------------------------
# schema validation


def test_core_manifests_validate_against_kubernetes_schemas():
    import kubernetes_validate

    checked, failures = 0, []
    for path, doc in manifests():
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as e:
            loc = ".".join(str(p) for p in e.path)
            failures.append(f"{path} {doc['kind']}/{doc['metadata']['name']}: {loc}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            failures.append(f"{path}: {e.message}")
    assert not failures, "\n".join(failures)
    assert checked >= 20, f"only {checked} core objects found under infra/k8s"


def test_validation_is_strict_enough_to_catch_a_typo():
    import kubernetes_validate

    bad = copy.deepcopy(one("Deployment", "onerec-serving"))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _as_pod(spec: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def test_custom_resources_are_structurally_valid():
    import kubernetes_validate

    for kind, api in CUSTOM_KINDS.items():
        assert docs_of(kind), f"no {kind} under infra/k8s"
        for doc in docs_of(kind):
            assert doc["apiVersion"] == api, (
                f"{kind} {doc['metadata']['name']}: apiVersion {doc['apiVersion']}"
            )
            assert doc["metadata"]["name"] and doc["metadata"]["namespace"]
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
            assert len(doc["metadata"]["name"]) <= 63

    for app in docs_of("SparkApplication"):
        s = app["spec"]
        name = app["metadata"]["name"]
        for key in ("type", "mode", "image", "mainApplicationFile", "sparkVersion", "driver", "executor"):
            assert key in s, f"SparkApplication {name}: spec.{key} missing"
        assert s["type"] == "Python" and s["mode"] == "cluster"
        assert s["mainApplicationFile"].startswith("local:///"), "the job file ships in the image"
        assert all(isinstance(a, str) for a in s.get("arguments", []))
        assert s["restartPolicy"]["type"] in ("Never", "OnFailure", "Always")
        for role in ("driver", "executor"):
            r = s[role]
            assert isinstance(r["cores"], int) and r["cores"] >= 1
            assert re.fullmatch(r"\d+[kmgt]", r["memory"]), f"{name}.{role}.memory {r['memory']!r}"
        assert s["driver"]["serviceAccount"] == "onerec-spark"
        assert s["executor"]["instances"] >= 1
        for key, value in s.get("sparkConf", {}).items():
            assert isinstance(value, str), f"{name}: sparkConf {key} must be a string"

    for job in docs_of("PyTorchJob"):
        name = job["metadata"]["name"]
        specs = job["spec"]["pytorchReplicaSpecs"]
        assert set(specs) <= {"Master", "Worker"} and "Master" in specs
        assert specs["Master"]["replicas"] == 1
        assert isinstance(job["spec"]["nprocPerNode"], str), "nprocPerNode is a string in kubeflow.org/v1"
        for role, r in specs.items():
            assert r["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
            spec = r["template"]["spec"]
            assert [c["name"] for c in spec["containers"]][0] == "pytorch", "the operator needs 'pytorch'"
            # The pod template inside the custom resource is a core PodSpec: validate it as one.
            kubernetes_validate.validate(_as_pod(spec, f"{name}-{role.lower()}"), K8S_VERSION, strict=True)


def test_kustomize_layout_and_generated_configmaps():
    import kubernetes_validate

    names = set()
    for kfile in sorted(K8S.rglob("kustomization.yaml")):
        k = yaml.safe_load(kfile.read_text())
        assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
        for res in k.get("resources", []):
            assert (kfile.parent / res).exists(), f"{kfile}: resource {res} does not exist"
        for gen in k.get("configMapGenerator", []):
            names.add(gen["name"])
            for item in gen["files"]:
                key, _, rel = item.partition("=")
                src = (kfile.parent / rel).resolve()
                assert src == CLUSTER_YAML.resolve(), f"{gen['name']}: {src} is not configs/cluster.yaml"
                cm = {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": gen["name"]},
                    "data": {key: src.read_text()},
                }
                kubernetes_validate.validate(cm, K8S_VERSION, strict=True)
    assert {"onerec-config", "onerec-config-serving"} <= names
    # Every ConfigMap a manifest mounts is generated from cluster.yaml or defined in the manifests.
    defined = names | {d["metadata"]["name"] for d in docs_of("ConfigMap")}
    sources = [d for _, d in manifests()] + [helm_values()]
    for doc in sources:
        for _, key, value in walk(doc):
            if key == "configMap" and isinstance(value, dict):
                assert value["name"] in defined, f"ConfigMap {value['name']} is never created"
            if key == "configMaps" and isinstance(value, list):
                assert all(v["name"] in defined for v in value)
    # The configuration the cluster runs is valid as it stands.
    assert cluster_cfg().env == "cluster" and cluster_cfg().cluster.runtime == "cluster"


# --------------------------------------------------------------------------------------
# names in the manifests exist in the code


def test_spark_jobs_have_an_application_and_an_entry_point():
    apps = {a["spec"]["mainApplicationFile"]: a for a in docs_of("SparkApplication")}
    missing_apps = [j for j in SPARK_JOBS if f"local:///app/jobs/{j}.py" not in apps]
    assert not missing_apps, f"no SparkApplication for jobs {missing_apps}"
    not_landed = []
    for uri, app in apps.items():
        rel = uri.removeprefix("local:///app/")
        assert rel.startswith("jobs/") and rel.endswith(".py")
        if not (REPO / rel).is_file():
            not_landed.append(rel)
        args = app["spec"]["arguments"]
        assert args[args.index("--date") + 1] == DS, "the job gets the run's date"
    assert not not_landed, f"Spark entry points named in infra/ but not in the repo (yet): {not_landed}"


def test_onerec_prod_commands_exist():
    from onerec_prod.cli import COMMANDS, _selected

    seen = set()
    for where, c in containers():
        argv = list(c.get("command", [])) + list(c.get("args", []))
        if not argv or argv[0] != "onerec-prod":
            continue
        rest = argv[1:]
        sub = _selected(rest)
        assert sub in COMMANDS, f"{where}: `onerec-prod {' '.join(rest)}` names no subcommand in COMMANDS"
        # Global options go before the subcommand; the config is the cluster file.
        assert rest.index("--config") < rest.index(sub), f"{where}: --config must precede {sub}"
        assert rest[rest.index("--config") + 1] == "configs/cluster.yaml"
        assert c.get("workingDir") == "/app", f"{where}: relative config path needs workingDir /app"
        if "--date" in rest:
            assert rest[rest.index("--date") + 1] == DS
        seen.add(sub)
    assert {"train", "rl", "precompute", "serve"} <= seen, f"commands run by manifests: {seen}"


def test_config_keys_named_in_manifests_exist():
    from onerec_prod.config import ENV_PREFIX, load_config

    env_overrides, set_overrides = {}, []
    for where, e in env_entries():
        if e["name"].startswith(ENV_PREFIX):
            dotted = e["name"][len(ENV_PREFIX) :].lower().replace("__", ".")
            assert config_field_exists(dotted), f"{where}: {e['name']} names no config field"
            env_overrides[e["name"]] = e.get("value", "")
        if e["name"] == "ONEREC_CONFIG":
            assert e["value"] == "/etc/onerec/cluster.yaml", f"{where}: ONEREC_CONFIG {e['value']}"
    for where, c in containers():
        argv = list(c.get("command", [])) + list(c.get("args", []))
        for i, tok in enumerate(argv):
            if tok in ("--set", "-s"):
                set_overrides.append(argv[i + 1])
                assert config_field_exists(argv[i + 1].split("=", 1)[0]), f"{where}: --set {argv[i + 1]}"
    assert env_overrides, "expected at least the per-job ONEREC__CLUSTER__MASTER_ADDR"
    # And the loader accepts them together with the cluster file.
    load_config(CLUSTER_YAML, set_overrides, environ=env_overrides)
    # Every mount of the config ConfigMap is the file the commands and ONEREC_CONFIG name.
    for where, c in containers():
        for m in c.get("volumeMounts", []):
            if m.get("subPath") == "cluster.yaml":
                assert m["mountPath"] == "/app/configs/cluster.yaml", where


def test_images_exist():
    cfg = cluster_cfg()
    name, _, tag = cfg.cluster.image.rpartition(":")
    ours = {cfg.cluster.image, f"{name}-serving:{tag}"}
    images = []
    for path, doc in manifests():
        images += [(path, v) for _, k, v in walk(doc) if k == "image" and isinstance(v, str)]
    for key, img in helm_values()["images"].items():
        images.append((f"helm images.{key}", f"{img['repository']}:{img['tag']}"))
    images.append(("configs/cluster.yaml spark", cfg.spark.extra_conf["spark.kubernetes.container.image"]))
    for where, image in images:
        assert image.startswith(INTERNAL_REGISTRY), f"{where}: {image} is not from the internal registry"
        assert not image.endswith(":latest") and ":" in image, f"{where}: {image} must be pinned"
        if "/onerec-prod" in image:
            assert image in ours, (
                f"{where}: {image} is not cluster.image {cfg.cluster.image} or its serving variant"
            )
    assert {i for _, i in images} >= ours
    # The serving Deployment runs the serving image; everything else of ours the runtime image.
    serving = one("Deployment", "onerec-serving")["spec"]["template"]["spec"]["containers"][0]
    assert serving["image"] == f"{name}-serving:{tag}"
    # Both images are targets of the Dockerfile, whose files exist.
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM \S+ AS runtime$", text, re.M) and re.search(
        r"^FROM runtime AS serving$", text, re.M
    )
    for m in re.finditer(r"^ARG BASE_IMAGE=(\S+)$", text, re.M):
        assert m.group(1).startswith(INTERNAL_REGISTRY)
    for src in re.findall(r"^COPY (?:--\S+ )*(\S+) \S+$", text, re.M):
        assert src == "." or (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    for script in re.findall(r"infra/docker/[\w./-]+", text):
        assert (REPO / script).exists(), f"Dockerfile names {script}"
    assert os.access(INFRA / "docker" / "spark-entrypoint.sh", os.X_OK)
    assert (INFRA / "docker" / "Dockerfile.dockerignore").exists()
    for line in (INFRA / "docker" / "requirements-cluster.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[\w.]+", line.strip()), f"unpinned: {line}"


# --------------------------------------------------------------------------------------
# secrets


def referenced_secrets() -> set[str]:
    names = set()
    for _, doc in list(manifests()) + [("helm", helm_values())]:
        for _, key, value in walk(doc):
            if key in ("secretKeyRef", "secretRef") and isinstance(value, dict):
                names.add(value["name"])
            if key == "authorization" and isinstance(value, dict) and "credentials" in value:  # ServiceMonitor
                names.add(value["credentials"]["name"])
            if key == "secret" and isinstance(value, dict) and "secretName" in value:  # mounted as files
                names.add(value["secretName"])
            if key == "sparkConf":
                names |= {v.split(":")[0] for k, v in value.items() if ".secretKeyRef." in k}
    hv = helm_values()
    names |= {hv[k] for k in ("fernetKeySecretName", "apiSecretKeySecretName", "jwtSecretName")}
    names |= {hv["data"]["metadataSecretName"], hv["dags"]["gitSync"]["credentialsSecret"]}
    names |= set(re.findall(r"name:\s*([\w-]+)", hv.get("extraEnvFrom") or ""))
    return names


def test_no_literal_secret_values():
    # No Secret objects with data in the repo: secrets are created out of band.
    for doc in docs_of("Secret"):
        assert not doc.get("data") and not doc.get("stringData"), (
            f"Secret {doc['metadata']['name']} has values"
        )
    # Secret-looking variables always come from a Secret.
    for where, e in env_entries():
        if SECRETISH.search(e["name"]):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            assert ref and "value" not in e, f"{where}: {e['name']} must come from a secretKeyRef"
    # Helm: none of the chart's inline secret values is set.
    hv = helm_values()
    for key in ("fernetKey", "apiSecretKey", "webserverSecretKey", "jwtSecret"):
        assert not hv.get(key), f"helm values set {key} inline"
    assert "metadataConnection" not in hv.get("data", {})
    # Every secret the deployment needs is documented (how to create it) in infra/README.md.
    readme = (INFRA / "README.md").read_text()
    undocumented = sorted(n for n in referenced_secrets() if n not in readme)
    assert not undocumented, f"secrets not documented in infra/README.md: {undocumented}"


SECRET_PATTERNS = {
    "credentials in a URI": re.compile(r"\w+://[^/\s:@'\"]+:[^/\s@'\"$]+@"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "access key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "password assignment": re.compile(r"(?i)\bpass(word)?\s*[:=]\s*['\"]?[^\s'\"$<{]{4,}"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
}


def repo_files() -> list[Path]:
    """Every file a clone holds (git's tracked + untracked-not-ignored), else a walk minus var/ and venvs."""
    import subprocess

    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True).stdout
        files = [REPO / n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "var", "__pycache__", "node_modules"}
        files = [p for p in REPO.rglob("*") if not skip & set(p.relative_to(REPO).parts)]
    return [p for p in files if p.is_file()]


def test_no_secret_values_anywhere_in_the_repo():
    """Text scan of the whole repository (code, tests, docs, configs, infra), not only infra/."""
    files = repo_files()
    assert REPO / "configs" / "cluster.yaml" in files and DOCKERFILE in files
    assert len(files) > 100, "the scan must see the repository, not a handful of files"
    found = []
    for f in files:
        try:
            text = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary
        for what, pat in SECRET_PATTERNS.items():
            m = pat.search(text)
            if m:
                found.append(f"{f.relative_to(REPO)}: looks like a {what}: {m.group(0)!r}")
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------------------
# the cluster shape agrees with configs/cluster.yaml


def test_training_jobs_match_cluster_config():
    cfg = cluster_cfg()
    from onerec_prod.train.launcher import job_shape

    for step in ("train", "rl"):
        job = one("PyTorchJob", f"onerec-{step}-")
        specs = job["spec"]["pytorchReplicaSpecs"]
        nodes, per_node = job_shape(cfg, step)  # train: 10 x 8; rl: 1 x grpo.nproc
        assert sum(r["replicas"] for r in specs.values()) == nodes
        assert int(job["spec"]["nprocPerNode"]) == per_node == cfg.cluster.gpus_per_node
        assert cfg.train.nnodes == cfg.cluster.training_nodes
        for r in specs.values():
            pod = r["template"]["spec"]
            c = pod["containers"][0]
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == cfg.cluster.gpus_per_node
            assert c["ports"][0]["containerPort"] == cfg.cluster.master_port
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["ONEREC__CLUSTER__MASTER_ADDR"] == f"{job['metadata']['name']}-master-0"
            assert any(k.startswith("NCCL_") for k in env)
            vols = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            shared = vols[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"]
            assert cfg.paths.models_root.startswith("/mnt/shared/")
            assert cfg.paths.var_root in mounts
            pvc = one("PersistentVolumeClaim", shared)
            assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
            assert c["args"][c["args"].index("--date") - 1] == step


def test_spark_applications_match_cluster_config():
    conf = cluster_cfg().spark.extra_conf
    for app in docs_of("SparkApplication"):
        s = app["spec"]
        assert s["image"] == conf["spark.kubernetes.container.image"]
        assert str(s["executor"]["instances"]) == conf["spark.executor.instances"]
        assert s["executor"]["memory"] == conf["spark.executor.memory"]
        assert str(s["executor"]["cores"]) == conf["spark.executor.cores"]
        assert s["driver"]["memory"] == cluster_cfg().spark.driver_memory
        assert (
            s["driver"]["serviceAccount"] == conf["spark.kubernetes.authenticate.driver.serviceAccountName"]
        )
        assert s["sparkVersion"] == version("pyspark")
    assert cluster_cfg().spark.master.startswith("k8s://")


def test_serving_and_mlflow_match_cluster_config():
    cfg = cluster_cfg()
    assert cfg.serving.backend == "vllm"
    dep = one("Deployment", "onerec-serving")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["ports"][0]["containerPort"] == cfg.serving.port
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "httpGet" not in c["livenessProbe"], "liveness must not depend on a champion being loaded"
    # the bearer token: the file serving.token_file names comes from a mounted Secret
    assert cfg.serving.auth == "token"
    token_file = Path(cfg.serving.token_file)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(token_file.parent))
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert mount.get("readOnly") and token_file.name in [i["path"] for i in vol["secret"]["items"]]
    hpa = one("HorizontalPodAutoscaler", "onerec-serving")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = one("PodDisruptionBudget", "onerec-serving")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    svc = one("Service", "onerec-serving")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]

    tracking = urlparse(cfg.registry.tracking_uri)
    host = tracking.hostname.split(".")
    mlflow_svc = one("Service", host[0])
    assert host[1] == cfg.cluster.namespace and mlflow_svc["spec"]["ports"][0]["port"] == tracking.port
    mlflow = one("Deployment", host[0])["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(mlflow["args"])
    assert f"{tracking.hostname}:{tracking.port}" in args, "tracking host must pass --allowed-hosts"
    assert cfg.registry.artifact_location.startswith("mlflow-artifacts:/") and "--serve-artifacts" in args
    bucket = urlparse(cfg.paths.lake_root).netloc
    assert f"--artifacts-destination=s3://{bucket}/" in args


def test_namespace_airflow_pool_and_helm_values():
    cfg = cluster_cfg()
    for path, doc in manifests():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == cfg.cluster.namespace, f"{path}: {doc['metadata']}"
    assert one("Namespace", cfg.cluster.namespace)
    pool = one("Job", "airflow-pool-init")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert pool[:3] == ["airflow", "pools", "set"]
    assert pool[3] == cfg.airflow.gpu_pool and int(pool[4]) == cfg.airflow.gpu_pool_slots
    assert cfg.airflow.gpu_pool_slots == cfg.cluster.training_nodes * cfg.cluster.gpus_per_node
    assert cfg.airflow.train_pool_slots <= cfg.airflow.gpu_pool_slots
    hv = helm_values()
    assert hv["executor"] == "KubernetesExecutor"
    assert hv["dags"]["gitSync"]["enabled"] and hv["dags"]["gitSync"]["subPath"] == "dags"
    assert (REPO / hv["dags"]["gitSync"]["subPath"]).is_dir()
    assert hv["config"]["kubernetes_executor"]["namespace"] == cfg.cluster.namespace
    assert hv["postgresql"]["enabled"] is False
    assert hv["airflowVersion"] == version("apache-airflow")


def test_static_training_job_matches_launcher_rendering():
    """The launcher renders the job the DAG submits; the static template is the same job.

    Compared: kind, namespace, nodes, GPUs per node, image, container name, restart policy, the
    command and the rendezvous host; the torchrun command every pod then runs is c10d
    rendezvous (never --standalone) over 10 nodes x 8 GPUs, from the launcher's one function.
    """
    from onerec_prod.train import launcher  # our own module: a broken import fails, never skips

    cfg = cluster_cfg()
    rendered = launcher.render_pytorchjob(cfg, "train", DS)  # the static file as loaded: ds filled in
    static = one("PyTorchJob", "onerec-train-")
    assert (rendered["apiVersion"], rendered["kind"]) == (static["apiVersion"], static["kind"])
    assert rendered["metadata"]["namespace"] == static["metadata"]["namespace"]
    assert str(rendered["spec"]["nprocPerNode"]) == static["spec"]["nprocPerNode"]
    r_specs, s_specs = rendered["spec"]["pytorchReplicaSpecs"], static["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in r_specs.items()} == {k: v["replicas"] for k, v in s_specs.items()}
    for role in s_specs:
        rc = r_specs[role]["template"]["spec"]["containers"][0]
        sc = s_specs[role]["template"]["spec"]["containers"][0]
        assert rc["name"] == sc["name"] == "pytorch"
        assert rc["image"] == sc["image"]
        assert (rc["command"], rc["args"]) == (sc["command"], sc["args"])
        assert r_specs[role]["restartPolicy"] == s_specs[role]["restartPolicy"]
        for kind in ("limits", "requests"):
            assert str(rc["resources"][kind]["nvidia.com/gpu"]) == sc["resources"][kind]["nvidia.com/gpu"]
    argv = launcher.cluster_launch_argv(cfg, "train", "2014-01-01")
    assert "--standalone" not in argv and "--rdzv_backend=c10d" in argv
    assert "--nnodes=10" in argv and "--nproc_per_node=8" in argv
    assert "--rdzv_endpoint=onerec-train-20140101-master-0:29500" in argv
    # The rendered job is a valid PyTorchJob whose pod spec is a valid core PodSpec.
    import kubernetes_validate

    for role, r in r_specs.items():
        kubernetes_validate.validate(
            _as_pod(r["template"]["spec"], f"rendered-{role.lower()}"), K8S_VERSION, strict=True
        )


# --------------------------------------------------------------------------------------
# MLflow authentication, per-component network policies, the serving scrape


def readme_secrets() -> dict[str, set[str]]:
    """Secret name -> the keys its row of infra/README.md's table lists."""
    rows = {}
    for m in re.finditer(r"^\| `([\w-]+)` \| ([^|]*) \|", (INFRA / "README.md").read_text(), re.M):
        rows[m.group(1)] = set(re.findall(r"`([\w.-]+)`", m.group(2)))
    return rows


def secret_key_refs() -> list[tuple[str, str, str]]:
    """(where, secret, key) for every key a manifest reads out of a Secret."""
    out = []
    for path, doc in manifests():
        for _, key, value in walk(doc):
            if key == "secretKeyRef" and isinstance(value, dict):
                out.append((path, value["name"], value["key"]))
            if key == "authorization" and isinstance(value, dict) and "credentials" in value:
                out.append((path, value["credentials"]["name"], value["credentials"]["key"]))
            if key == "secret" and isinstance(value, dict) and "secretName" in value:
                out += [(path, value["secretName"], i["key"]) for i in value.get("items", [])]
            if key == "sparkConf":
                out += [(path, *v.split(":", 1)) for k, v in value.items() if ".secretKeyRef." in k]
    return out


def test_every_referenced_secret_and_key_is_declared():
    """Every Secret a manifest or the Helm values name has a row in infra/README.md's table (how
    to create it), every key read out of it is in that row, and every row is used."""
    rows = readme_secrets()
    refs = referenced_secrets()
    assert not sorted(refs - rows.keys()), f"secrets without a row in infra/README.md: {sorted(refs - rows.keys())}"
    assert not sorted(rows.keys() - refs), f"README rows no manifest uses: {sorted(rows.keys() - refs)}"
    missing = sorted({(s, k, w) for w, s, k in secret_key_refs() if k not in rows[s]})
    assert not missing, f"keys read from a Secret but not listed in its README row: {missing}"
    # ... and the README says how to create each of them
    text = (INFRA / "README.md").read_text()
    uncreated = sorted(n for n in rows if f"create secret generic {n} " not in text)
    assert not uncreated, f"no `kubectl create secret` line for {uncreated}"


def _env_from(spec: dict) -> list[str]:
    return [e["secretRef"]["name"] for c in spec["containers"] for e in c.get("envFrom", []) if "secretRef" in e]


def test_mlflow_basic_auth_and_separate_credentials():
    """The MLflow server runs the basic-auth app (no credentials: 401; nothing granted by
    default); the pipeline and serving reach it as different users, serving's read-only."""
    from onerec_prod import k8s
    from onerec_prod.registry import mlflow_auth
    from onerec_prod.train import launcher

    cfg = cluster_cfg()
    dep = one("Deployment", "mlflow")["spec"]["template"]["spec"]
    (srv,) = dep["containers"]
    assert "--app-name=basic-auth" in srv["args"]
    env = {e["name"]: e for e in srv["env"]}
    ini_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "onerec-mlflow-admin", var
    # the ini the server reads: written by the init container from the ConfigMap template into a
    # memory volume that the server mounts at MLFLOW_AUTH_CONFIG_PATH's directory
    vols = {v["name"]: v for v in dep["volumes"]}
    mount = next(m for m in srv["volumeMounts"] if m["mountPath"] == str(ini_path.parent))
    assert vols[mount["name"]]["emptyDir"]["medium"] == "Memory"
    (init,) = dep["initContainers"]
    assert any(m["name"] == mount["name"] for m in init["volumeMounts"]) and str(ini_path) in init["args"][0]
    template = one("ConfigMap", "mlflow-auth-config")["data"][ini_path.name]
    import configparser

    ini = configparser.ConfigParser()
    ini.read_string(template)
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    placeholder = ini["mlflow"]["database_uri"]
    assert placeholder.startswith("@") and placeholder in init["args"][0], "the auth DB URI comes from the Secret"
    init_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in init["env"]}
    assert init_env[placeholder.strip("@")] == {"name": "onerec-mlflow-db", "key": "MLFLOW_AUTH_DATABASE_URI"}
    assert "mlflow_auth" in one("ConfigMap", "onerec-postgres-init")["data"]["10-airflow-db.sh"]

    pipeline, serving = cfg.cluster.mlflow_secret, "onerec-mlflow-serving"
    assert pipeline == "onerec-mlflow-pipeline"
    # the users-init Job gives READ to the user of serving's Secret and MANAGE to the pipeline's
    assert (mlflow_auth.SERVING_PERMISSION, mlflow_auth.PIPELINE_PERMISSION) == ("READ", "MANAGE")
    job = one("Job", "mlflow-users-init")["spec"]["template"]["spec"]["containers"][0]
    jenv = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in job["env"]}
    assert job["command"][:3] == ["python", "-m", mlflow_auth.__name__]
    for prefix, secret in (("ONEREC_MLFLOW_SERVING", serving), ("ONEREC_MLFLOW_PIPELINE", pipeline)):
        for part in ("USERNAME", "PASSWORD"):
            assert jenv[f"{prefix}_{part}"] == {"name": secret, "key": f"MLFLOW_TRACKING_{part}"}
    assert jenv["MLFLOW_TRACKING_USERNAME"]["name"] == "onerec-mlflow-admin"

    # serving's credential is the read-only one, and only that one
    serving_pod = one("Deployment", "onerec-serving")["spec"]["template"]["spec"]
    assert serving in _env_from(serving_pod) and pipeline not in _env_from(serving_pod)
    # every pipeline pod that talks to MLflow has the pipeline's, never serving's: the static
    # templates, the launcher's PyTorchJobs, the DAG's stage pods, the Airflow pods
    pods = {f"{d['kind']}/{d['metadata']['name']}": ps for _, d in manifests() for ps in pod_specs(d)
            if d["metadata"]["name"].startswith(("onerec-train", "onerec-rl", "onerec-precompute", "onerec-gpu-step"))}
    for step in ("train", "rl"):
        for role, r in launcher.render_pytorchjob(cfg, step, DS)["spec"]["pytorchReplicaSpecs"].items():
            pods[f"rendered {step}/{role}"] = r["template"]["spec"]
    for task in k8s.POD_STAGES:
        pods[f"stage pod {task}"] = k8s.stage_pod(cfg, task, DS)["spec"]
    assert len(pods) >= 10, sorted(pods)
    for where, ps in pods.items():
        assert pipeline in _env_from(ps) and serving not in _env_from(ps), where
    airflow_env = set(re.findall(r"name:\s*([\w-]+)", helm_values()["extraEnvFrom"]))
    assert pipeline in airflow_env and serving not in airflow_env


def _selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        op, key, vals = e["operator"], e["key"], e.get("values", [])
        ok = {"In": labels.get(key) in vals, "NotIn": labels.get(key) not in vals,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _pod_labels() -> dict[str, dict]:
    """Every kind of pod the deployment runs -> its labels: the manifests, the launcher's and
    the DAG's renderings, Spark drivers/executors, and the Airflow chart's pods (tier=airflow)."""
    from onerec_prod import k8s
    from onerec_prod.train import launcher

    cfg = cluster_cfg()
    out = {}
    for _, d in manifests():
        spec = d.get("spec", {})
        if d["kind"] == "PyTorchJob":
            for role, r in spec["pytorchReplicaSpecs"].items():
                out[f"{d['metadata']['name']}/{role}"] = r["template"]["metadata"]["labels"]
        elif d["kind"] == "SparkApplication":
            for role in ("driver", "executor"):
                out[f"{d['metadata']['name']}/{role}"] = spec[role]["labels"]
        elif d["kind"] == "Pod":
            out[d["metadata"]["name"]] = d["metadata"]["labels"]
        elif pod_specs(d):
            tmpl = spec["template"] if "template" in spec else spec["jobTemplate"]["spec"]["template"]
            out[f"{d['kind']}/{d['metadata']['name']}"] = tmpl["metadata"]["labels"]
    for step in ("train", "rl"):
        job = launcher.render_pytorchjob(cfg, step, DS)
        for role, r in job["spec"]["pytorchReplicaSpecs"].items():
            out[f"rendered {step}/{role}"] = r["template"]["metadata"]["labels"]
    for task in k8s.POD_STAGES:
        out[f"stage pod {task}"] = k8s.stage_pod(cfg, task, DS)["metadata"]["labels"]
    for comp in ("scheduler", "api-server", "dag-processor", "triggerer", "worker"):
        out[f"airflow {comp}"] = {"tier": "airflow", "component": comp, "release": "airflow"}
    return out


def test_every_component_has_a_network_policy():
    """Ingress is denied by default in the namespace, and every pod the deployment runs is
    selected by a policy of its own component (mlflow, serving, airflow, spark, training, ...)."""
    import kubernetes_validate

    policies = docs_of("NetworkPolicy")
    for p in policies:
        kubernetes_validate.validate(p, K8S_VERSION, strict=True)
        assert "Ingress" in p["spec"]["policyTypes"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny, "no default-deny ingress policy"
    own = [p for p in policies if p["spec"]["podSelector"] != {}]
    pods = _pod_labels()
    assert len(pods) >= 20, sorted(pods)
    unselected = sorted(w for w, lab in pods.items() if not any(_selects(p["spec"]["podSelector"], lab) for p in own))
    assert not unselected, f"pods no component NetworkPolicy selects: {unselected}"
    for name in ("mlflow", "onerec-serving", "airflow", "onerec-spark", "onerec-train", "onerec-rl", "onerec-postgres"):
        assert one("NetworkPolicy", name)

    def allowed(policy: dict, labels: dict, port: int | None = None) -> bool:
        for rule in policy["spec"].get("ingress", []):
            ports = [pp["port"] for pp in rule.get("ports", [])]
            if port is not None and ports and port not in ports:
                continue
            if any("podSelector" in f and "namespaceSelector" not in f and _selects(f["podSelector"], labels)
                   for f in rule.get("from", [])):
                return True
        return False

    # MLflow: the pipeline and serving get in on 5000; Spark executors and training ranks of
    # other jobs do not reach postgres; nothing reaches the batch pods
    mlflow, pg = one("NetworkPolicy", "mlflow"), one("NetworkPolicy", "onerec-postgres")
    for w in ("Deployment/onerec-serving", "rendered train/Master", "stage pod promote", "airflow worker",
              "Job/mlflow-users-init"):
        assert allowed(mlflow, pods[w], 5000), w
    spark_exec = next(lab for w, lab in pods.items() if w.endswith("/executor"))
    assert not allowed(mlflow, spark_exec, 5000)
    for w in ("Deployment/onerec-serving", "rendered train/Master", "stage pod promote"):
        assert not allowed(pg, pods[w], 5432), w
    assert allowed(pg, pods["Deployment/mlflow"], 5432) and allowed(pg, pods["airflow scheduler"], 5432)
    # serving: only other namespaces (its clients, Prometheus), no pod of the pipeline
    serving = one("NetworkPolicy", "onerec-serving")
    assert not any(allowed(serving, lab) for lab in pods.values())
    # training ranks meet only ranks of their own kind
    train = one("NetworkPolicy", "onerec-train")
    assert allowed(train, pods["rendered train/Worker"]) and not allowed(train, pods["rendered rl/Master"])
    batch = [p for p in own if _selects(p["spec"]["podSelector"], pods["stage pod precompute"])]
    assert batch and all(p["spec"]["ingress"] == [] for p in batch)


def test_prometheus_scrapes_serving_with_the_serving_token():
    """The ServiceMonitor selects the serving Service, scrapes its named port at /metrics and
    sends the bearer token of the Secret serving reads its token file from; the serving
    NetworkPolicy lets the Prometheus namespace in on that port. Airflow's StatsD exporter is on
    and scraped too."""
    hv = helm_values()
    assert hv["statsd"]["enabled"] and hv["config"]["metrics"]["statsd_on"] == "True"
    assert hv["config"]["metrics"]["statsd_host"] == "airflow-statsd"  # release `airflow` (README)
    assert "helm install airflow " in (INFRA / "README.md").read_text()
    statsd = one("ServiceMonitor", "airflow-statsd")["spec"]
    assert statsd["selector"]["matchLabels"] == {"tier": "airflow", "component": "statsd"}
    (sep,) = statsd["endpoints"]
    assert sep["port"] == "statsd-scrape"
    airflow_np = one("NetworkPolicy", "airflow")["spec"]["ingress"]
    assert any({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in r["from"]
               and 9102 in [p["port"] for p in r.get("ports", [])] for r in airflow_np)

    sm = one("ServiceMonitor", "onerec-serving")["spec"]
    svc = one("Service", "onerec-serving")
    assert _selects(sm["selector"], svc["metadata"]["labels"])
    assert svc["metadata"]["namespace"] in sm["namespaceSelector"]["matchNames"]
    (ep,) = sm["endpoints"]
    port = next(p for p in svc["spec"]["ports"] if p["name"] == ep["port"])
    assert ep["path"] == "/metrics"
    dep = one("Deployment", "onerec-serving")["spec"]["template"]["spec"]
    token_file = Path(cluster_cfg().serving.token_file)
    mount = next(m for m in dep["containers"][0]["volumeMounts"] if m["mountPath"] == str(token_file.parent))
    vol = next(v for v in dep["volumes"] if v["name"] == mount["name"])["secret"]
    key = next(i["key"] for i in vol["items"] if i["path"] == token_file.name)
    assert ep["authorization"] == {"type": "Bearer", "credentials": {"name": vol["secretName"], "key": key}}
    container_port = next(p["containerPort"] for p in dep["containers"][0]["ports"] if p["name"] == port["targetPort"])
    policy = one("NetworkPolicy", "onerec-serving")["spec"]["ingress"]
    assert any({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in r["from"]
               and container_port in [p["port"] for p in r["ports"]] for r in policy)


# --------------------------------------------------------------------------------------
# capacity arithmetic


def _capacity():
    spec = importlib.util.spec_from_file_location("infra_capacity", INFRA / "capacity.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_capacity_row_worked_by_hand():
    cap = _capacity()
    # Qwen3-8B, 24 h window, 20B tokens/day on 80 GPUs, seq 4096, +24,578 itemic tokens.
    # One layer: q,o 2*4096*4096 + k,v 2*4096*8*128 + MLP 3*4096*12288 + norms 2*4096+2*128
    layer = 33_554_432 + 8_388_608 + 150_994_944 + 8_192 + 256
    assert cap.QWEN3_8B.layer_params() == layer == 192_946_432
    n_matmul = 36 * layer + 4096 * (151_936 + 24_578)  # layers + LM head
    assert cap.QWEN3_8B.matmul_params(24_578) == n_matmul == 7_669_072_896
    flops = 6 * n_matmul + 12 * 36 * 4096 * 4096
    assert cap.train_flops_per_token(cap.QWEN3_8B, 4096, 24_578) == flops == 53_262_194_688
    tps = 20e9 / 80 / 86_400  # 2,893.5 tokens/s/GPU
    assert cap.tokens_per_s_per_gpu(20e9, 80, 24) == pytest.approx(tps)
    row = cap.window_rows(20e9, 80, 4096, windows_h=(24,))[0]
    assert row["tokens_s_gpu"] == pytest.approx(2893.52, abs=0.01)
    assert row["Qwen3-8B"] == pytest.approx(tps * flops / 989e12) == pytest.approx(0.1558, abs=1e-4)
    # ZeRO-2 over 80 ranks keeps bf16 weights whole and shards grads + Adam states.
    psi = cap.QWEN3_8B.total_params(24_578)
    assert cap.zero_memory_gib(cap.QWEN3_8B, 2, 80, 24_578) == pytest.approx(
        (2 * psi + 14 * psi / 80) / 2**30
    )
    assert cap.zero_memory_gib(cap.QWEN3_8B, 3, 80, 24_578) == pytest.approx(16 * psi / 80 / 2**30)


def test_capacity_launch_shape_is_what_the_launcher_renders():
    from onerec_prod.train.launcher import cluster_launch_argv

    argv = cluster_launch_argv(cluster_cfg(), "train", "DS")
    assert " ".join(argv) in (INFRA / "CAPACITY.md").read_text()
    assert "--nnodes=10" in argv and "--nproc_per_node=8" in argv and "--standalone" not in argv


def test_capacity_doc_matches_the_script():
    """CAPACITY.md quotes the script's default report; regenerate it when the script changes."""
    cap = _capacity()
    doc = (INFRA / "CAPACITY.md").read_text()
    report = cap.report(cap.PAPER_TOKENS_PER_DAY, cap.PAPER_GPUS, 4096, 4)
    missing = [line for line in report.splitlines() if line.startswith("| ") and line not in doc]
    assert not missing, "CAPACITY.md is out of date with infra/capacity.py:\n" + "\n".join(missing)
