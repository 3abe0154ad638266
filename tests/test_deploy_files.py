"""The deployment files: they parse, they agree with each other, and they name only metrics the
code exports, so renaming a metric or a port breaks a test instead of a dashboard or an alert.

No Docker or cluster is needed. With `promtool` on PATH (Debian package `prometheus`) the alert
rules, their unit tests and every dashboard query are also checked by Prometheus's own parser.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from tuneloop.server.config import ConfigError, load_config, read_api_keys
from tuneloop.server.metrics import Metrics
from tuneloop.trainer.metrics import TrainerMetrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tuneloop.json"
CONFIG = DEPLOY / "config" / "tuneloop.toml"
K8S = DEPLOY / "k8s"
DOCS = ROOT / "docs" / "deploy.md"

YAML_FILES = sorted(p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext))
JSON_FILES = sorted(DEPLOY.rglob("*.json"))
# Files whose text may name metrics: every such name must be exported by the code.
METRIC_USERS = [PROMETHEUS / "alerts.yml", PROMETHEUS / "alerts_test.yml", DASHBOARD]
METRIC_NAME = re.compile(r"\btuneloop_[a-z0-9_]+")
RECORDED_NAME = re.compile(r"\btuneloop:[a-z0-9_:]+")
PROMTOOL = shutil.which("promtool")


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# Kustomize overlays: patches over base plus their own objects, checked by their own tests.
OVERLAYS = ("gpu", "replicas")
REPLICAS = K8S / "replicas"


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object of the base and optional/ by (kind, name); overlays excluded."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.parent.name in OVERLAYS:
            continue
        for doc in yaml_docs(path):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def exported_sample_names() -> set[str]:
    """Sample names the server and trainer expose: counters as `_total`, histograms as `_bucket`/`_sum`/`_count`.

    A histogram's own name counts too: annotations name the histogram, not one of its series.
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("", "_bucket", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for registry in (Metrics(CollectorRegistry()).registry, TrainerMetrics(CollectorRegistry()).registry):
        for family in registry.collect():
            names.update(family.name + s for s in suffixes[family.type])
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            yield p["title"], t["expr"]


# --- every file parses ------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert yaml_docs(path), f"{path} is empty"


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_parses(path: Path) -> None:
    json.loads(path.read_text())


def test_dashboard_is_current_with_its_generator() -> None:
    build = load_module(DEPLOY / "grafana" / "build_dashboard.py")
    assert DASHBOARD.read_text() == build.render(), "run python deploy/grafana/build_dashboard.py"


# --- metric names -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", METRIC_USERS, ids=lambda p: p.name)
def test_only_exported_metrics_are_named(path: Path) -> None:
    used = set(METRIC_NAME.findall(path.read_text()))
    assert used, f"{path} names no tuneloop metric at all"
    unknown = used - exported_sample_names()
    assert not unknown, f"{path.name} names metrics neither server nor trainer exports: {sorted(unknown)}"


def test_recorded_series_used_are_defined() -> None:
    rules = [r for g in yaml_docs(PROMETHEUS / "alerts.yml")[0]["groups"] for r in g["rules"]]
    defined = {r["record"] for r in rules if "record" in r}
    used = {name for r in rules for name in RECORDED_NAME.findall(r["expr"])}
    assert used <= defined, f"undefined recording rules: {sorted(used - defined)}"
    assert defined <= used, f"recording rules nothing uses: {sorted(defined - used)}"


def test_every_alert_has_severity_and_a_runbook_section_in_the_docs() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in DOCS.read_text().splitlines()
        if line.startswith("#")
    }
    for group in yaml_docs(PROMETHEUS / "alerts.yml")[0]["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            doc, _, anchor = rule["annotations"]["runbook"].partition("#")
            assert doc == "docs/deploy.md" and anchor in headings, f"{rule['alert']}: no heading for #{anchor}"


# Skipped only outside CI: deploy/install.sh installs promtool, and in CI its absence is a failure.
@pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"), reason="promtool is not installed (Debian package prometheus)"
)
def test_promtool_accepts_config_rules_rule_tests_and_dashboard_queries(tmp_path: Path) -> None:
    def promtool(*args: str) -> None:
        run = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS)
        assert run.returncode == 0, f"promtool {' '.join(args)}:\n{run.stdout}\n{run.stderr}"

    promtool("check", "rules", "alerts.yml")
    promtool("check", "config", "prometheus.yml")
    promtool("test", "rules", "alerts_test.yml")
    # Dashboard queries, with Grafana's variables replaced, as recording rules promtool parses.
    substitutions = {"$__rate_interval": "5m", "$window": "1h", "$adapter": ".*"}
    rules = []
    for i, (title, expr) in enumerate(dashboard_queries(json.loads(DASHBOARD.read_text()))):
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{title}: unknown variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    queries = tmp_path / "dashboard_queries.yml"
    queries.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(queries))


# --- configuration ----------------------------------------------------------------------------


def test_shipped_config_is_accepted_by_the_server_and_puts_state_on_the_volume() -> None:
    cfg = load_config(["--config", str(CONFIG)], env={})
    assert (cfg.host, cfg.port, cfg.metrics_port) == ("0.0.0.0", 50051, 9400)
    assert cfg.store_url == "sqlite:////var/lib/tuneloop/tuneloop.db"
    assert cfg.adapter_dir == "/var/lib/tuneloop/adapters"


def test_configmap_carries_the_same_config_file() -> None:
    configmap = k8s_objects()[("ConfigMap", "tuneloop-config")]
    assert configmap["data"]["config.toml"] == CONFIG.read_text(), "copy deploy/config/tuneloop.toml into the ConfigMap"


def test_placeholder_api_key_secret_is_refused_by_the_server(tmp_path: Path) -> None:
    # A Secret applied without replacing the placeholder must stop the server, not open it.
    secret = k8s_objects()[("Secret", "tuneloop-api-keys")]
    keys = tmp_path / "api-keys"
    keys.write_text(secret["stringData"]["api-keys"])
    with pytest.raises(ConfigError):
        read_api_keys(str(keys))


def trainer_flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_trainer_uses_the_servers_store_and_registry_everywhere() -> None:
    server = tomllib.loads(CONFIG.read_text())["server"]
    compose = yaml_docs(DEPLOY / "compose.yaml")[0]["services"]["trainer"]["command"]
    pod = k8s_objects()[("Deployment", "tuneloop")]["spec"]["template"]["spec"]
    k8s = next(c for c in pod["containers"] if c["name"] == "trainer")["args"]
    for args in (compose, k8s):
        assert args[:2] == ["trainer", "run"]
        assert trainer_flag(args, "--store-url") == server["store_url"]
        assert trainer_flag(args, "--registry-dir") == server["adapter_dir"]
        assert trainer_flag(args, "--metrics-port") == "9401"


# --- wiring between files ---------------------------------------------------------------------


def test_prometheus_scrapes_the_configured_ports_under_the_jobs_the_alerts_use() -> None:
    jobs_config = yaml_docs(PROMETHEUS / "prometheus.yml")[0]["scrape_configs"]
    scrape = {j["job_name"]: j["static_configs"][0]["targets"] for j in jobs_config}
    assert scrape["tuneloop"] == ["tuneloop:9400"]
    assert scrape["tuneloop-trainer"] == ["trainer:9401"]
    monitor = yaml_docs(K8S / "optional" / "servicemonitor.yaml")[0]
    jobs = {e["port"]: e["relabelings"][0]["replacement"] for e in monitor["spec"]["endpoints"]}
    assert jobs == {"metrics": "tuneloop", "trainer-metrics": "tuneloop-trainer"}
    for job in re.findall(r'job="([^"]+)"', (PROMETHEUS / "alerts.yml").read_text()):
        assert job in scrape, f"alerts match job {job!r}, which nothing scrapes"


def test_compose_server_and_trainer_share_the_store_and_registry() -> None:
    compose = yaml_docs(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert services["tuneloop"]["volumes"] == services["trainer"]["volumes"]
    targets = {v.split(":")[1] for v in services["trainer"]["volumes"]}
    assert targets == {"/var/lib/tuneloop", "/var/lib/tuneloop/adapters"}
    assert (DEPLOY / compose["configs"]["tuneloop-config"]["file"]).resolve() == CONFIG
    provisioned = {"prometheus": ["./prometheus"], "grafana": ["./grafana/provisioning", "./grafana/dashboards"]}
    for service, mounts in provisioned.items():
        for src in mounts:
            assert any(v.startswith(src + ":") for v in services[service]["volumes"]), f"{service} lacks {src}"
            assert (DEPLOY / src).is_dir()


def test_k8s_pod_service_probes_and_monitor_agree() -> None:
    objects = k8s_objects()
    deployment = objects[("Deployment", "tuneloop")]
    pod = deployment["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    port_names = {p["name"]: p["containerPort"] for c in containers.values() for p in c["ports"]}
    assert port_names == {"grpc": 50051, "metrics": 9400, "trainer-metrics": 9401}

    for c in containers.values():
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert set(mounts.values()) <= volumes, f"{c['name']} mounts undeclared volumes"
        assert mounts["/var/lib/tuneloop"] == "data", f"{c['name']} must share the data volume"
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objects

    server = containers["server"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == port_names["grpc"], probe

    labels = pod["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        objects[("Service", "tuneloop")]["spec"]["selector"],
        objects[("PodDisruptionBudget", "tuneloop")]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items()
    service = objects[("Service", "tuneloop")]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(port_names)
    monitor = objects[("ServiceMonitor", "tuneloop")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}


def test_kustomizations_list_existing_files() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml_docs(kustomization)[0]
        for entry in spec.get("resources", []) + [p["path"] for p in spec.get("patches", [])]:
            assert (kustomization.parent / entry).exists(), f"{kustomization}: {entry} is missing"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_exposes_the_ports_and_copies_what_exists(dockerfile: str) -> None:
    text = (DEPLOY / dockerfile).read_text()
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert exposed == {50051, 9400, 9401}
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (ROOT / src).exists(), f"{dockerfile} copies {src}, which does not exist"
    assert 'ENTRYPOINT ["tuneloop"]' in text and "USER 10001:10001" in text


# --- the container health check ---------------------------------------------------------------


def start_health_server(
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = "127.0.0.1:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    return server, port, servicer


def test_healthcheck_follows_grpc_health() -> None:
    check = load_module(DEPLOY / "healthcheck.py")
    server, port, servicer = start_health_server()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check.main(["grpc", "--address", f"127.0.0.1:{port}"]) == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check.main(["grpc", "--address", f"127.0.0.1:{port}"]) == 0
    finally:
        server.stop(None)


def test_healthcheck_speaks_tls_and_mutual_tls(pki: dict[str, Path]) -> None:
    check = load_module(DEPLOY / "healthcheck.py")
    pair = [(pki["server.key"].read_bytes(), pki["server.crt"].read_bytes())]
    ca = pki["ca"].read_bytes()
    for mutual in (False, True):
        creds = grpc.ssl_server_credentials(pair, root_certificates=ca if mutual else None, require_client_auth=mutual)
        server, port, _ = start_health_server(creds)
        address = ["--timeout", "2", "grpc", "--address", f"localhost:{port}"]
        client = ["--cert", str(pki["client.crt"]), "--key", str(pki["client.key"])] if mutual else []
        try:
            assert check.main(address) == 1  # plaintext against TLS
            assert check.main([*address, "--ca", str(pki["ca"]), *client]) == 0
        finally:
            server.stop(None)


def test_healthcheck_fails_when_nothing_listens() -> None:
    check = load_module(DEPLOY / "healthcheck.py")
    assert check.main(["--timeout", "0.5", "grpc", "--address", "127.0.0.1:1"]) == 1
    assert check.main(["--timeout", "0.5", "http", "--url", "http://127.0.0.1:1/metrics"]) == 1


def test_healthcheck_http_sees_a_metrics_endpoint() -> None:
    check = load_module(DEPLOY / "healthcheck.py")
    httpd, _thread = start_http_server(0, addr="127.0.0.1", registry=CollectorRegistry())
    try:
        assert check.main(["http", "--url", f"http://127.0.0.1:{httpd.server_port}/metrics"]) == 0
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- the scale-out stack: N replicas on PostgreSQL and an object-store registry ------------------


def overlay_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """The replicas overlay's own objects (not its patches), by (kind, name)."""
    spec = yaml_docs(REPLICAS / "kustomization.yaml")[0]
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in spec["resources"]:
        if not entry.startswith(".."):
            for doc in yaml_docs(REPLICAS / entry):
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_replicas_overlay_patches_base_objects_and_shares_one_state_secret() -> None:
    base, own = k8s_objects(), overlay_objects()
    spec = yaml_docs(REPLICAS / "kustomization.yaml")[0]
    for patch in spec["patches"]:
        doc = yaml_docs(REPLICAS / patch["path"])[0]
        assert (doc["kind"], doc["metadata"]["name"]) in base, f"{patch['path']} patches nothing in base"
    secret = own[("Secret", "tuneloop-shared-state")]["stringData"]
    server = yaml_docs(REPLICAS / "server.yaml")[0]["spec"]
    assert server["replicas"] > 1 and server["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    trainer = own[("Deployment", "tuneloop-trainer")]["spec"]
    assert trainer["replicas"] == 1
    pods = [server["template"]["spec"], trainer["template"]["spec"]]
    pods += [own[("StatefulSet", n)]["spec"]["template"]["spec"] for n in ("tuneloop-postgres", "tuneloop-objects")]
    pods.append(own[("Job", "tuneloop-bucket")]["spec"]["template"]["spec"])
    for pod in pods:
        for c in pod["containers"]:
            for src in c.get("envFrom", []):
                assert src["secretRef"]["name"] == "tuneloop-shared-state"
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] == "tuneloop-shared-state":
                    assert ref["key"] in secret, f"{c['name']} reads {ref['key']}, which the Secret lacks"
    # Every replica and the trainer reach the in-cluster database and object store by Service name.
    services = {name for kind, name in own if kind == "Service"}
    assert "@tuneloop-postgres:5432/" in secret["TUNELOOP_STORE_URL"] and "tuneloop-postgres" in services
    assert secret["AWS_ENDPOINT_URL"] == "http://tuneloop-objects:9000" and "tuneloop-objects" in services
    headless = own[("Service", "tuneloop-replicas")]["spec"]
    assert headless["clusterIP"] == "None"
    server_labels = base[("Deployment", "tuneloop")]["spec"]["template"]["metadata"]["labels"]
    assert headless["selector"].items() <= server_labels.items()


def test_shared_state_from_compose_and_k8s_is_what_server_and_trainer_read() -> None:
    from tuneloop.cli.trainer import build_parser, config_from_args

    compose = yaml_docs(DEPLOY / "compose.replicas.yaml")[0]["services"]
    secret = overlay_objects()[("Secret", "tuneloop-shared-state")]["stringData"]
    compose_env = {k: str(v) for k, v in compose["tuneloop"]["environment"].items()}
    assert {k: str(v) for k, v in compose["trainer"]["environment"].items()}.items() <= compose_env.items()
    server_patch = yaml_docs(REPLICAS / "server.yaml")[0]["spec"]["template"]["spec"]["containers"]
    k8s_env = secret | {e["name"]: e["value"] for c in server_patch for e in c.get("env", [])}
    for env in (compose_env, k8s_env):
        cfg = load_config(["--config", str(CONFIG)], env=env)
        assert cfg.store_url.startswith("postgresql+psycopg://") and cfg.registry_url.startswith("s3://")
        assert cfg.durable_completions, "feedback sent to another replica must find its completion"
    trainers = [compose["trainer"]["command"], overlay_objects()[("Deployment", "tuneloop-trainer")]]
    trainers[1] = trainers[1]["spec"]["template"]["spec"]["containers"][0]["args"]
    for args in trainers:
        # No store or registry flags: the trainer reads the same variables as the server.
        assert args[:2] == ["trainer", "run"] and "--store-url" not in args and "--registry-url" not in args
        config_from_args(build_parser().parse_args(args[1:]))


def test_compose_replicas_stack_wires_balancer_and_prometheus() -> None:
    compose = yaml_docs(DEPLOY / "compose.replicas.yaml")[0]
    services = compose["services"]
    assert "ports" not in services["tuneloop"], "replicas are reached through the balancer, not a host port"
    assert services["balancer"]["ports"] == ["50051:50051"]
    mount = next(v for v in services["balancer"]["volumes"] if v.endswith(":/usr/local/etc/haproxy:ro"))
    assert (DEPLOY / mount.split(":")[0] / "haproxy.cfg").is_file()
    config = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    replicas_prom = yaml_docs(PROMETHEUS / Path(config.split("=", 1)[1]).name)[0]["scrape_configs"]
    single = yaml_docs(PROMETHEUS / "prometheus.yml")[0]["scrape_configs"]
    assert [j["job_name"] for j in replicas_prom] == [j["job_name"] for j in single], "the alerts match these jobs"
    server_job = next(j for j in replicas_prom if j["job_name"] == "tuneloop")
    assert server_job["dns_sd_configs"][0]["names"] == ["tuneloop"] and server_job["dns_sd_configs"][0]["port"] == 9400


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders kustomizations when present")
def test_kubectl_renders_the_replicas_overlay() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(REPLICAS)], capture_output=True, text=True, check=True).stdout
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    assert ("PersistentVolumeClaim", "tuneloop-data") not in rendered
    pod = rendered[("Deployment", "tuneloop")]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["server"]
    assert next(v for v in pod["volumes"] if v["name"] == "data") == {"name": "data", "emptyDir": {}}
    assert 9401 not in {p["port"] for p in rendered[("Service", "tuneloop")]["spec"]["ports"]}
