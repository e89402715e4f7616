"""deploy/k8s: every manifest matches its schema (kubernetes-validate for built-in kinds, strict subsets of
prometheus-operator's schemas for its CRDs), the validation is not vacuous, and the Deployment, Service,
ServiceMonitor, PVC and ConfigMap agree with each other and with the alerts. Fast: no cluster, no network."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from deploy_files import K8S, rules


# prometheus-operator's CRDs are not in kubernetes-validate's schemas. These are strict subsets of the
# openAPIV3Schema of monitoring.coreos.com/v1 ServiceMonitor and PrometheusRule (same field names, types,
# required fields and duration pattern as the operator's CRDs), limited to the fields these manifests use
# and closed to any other field, so a typo or a misplaced field fails rather than being ignored.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {"type": "object", "required": ["name"],
         "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                        "namespace": {"type": "string"}, "labels": _STRMAP, "annotations": _STRMAP},
         "additionalProperties": False}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
            "metadata": _META,
            "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                     "properties": {
                         "jobLabel": {"type": "string"},
                         "selector": {"type": "object", "additionalProperties": False,
                                      "properties": {"matchLabels": _STRMAP, "matchExpressions": {"type": "array"}}},
                         "namespaceSelector": {"type": "object", "additionalProperties": False,
                                               "properties": {"any": {"type": "boolean"},
                                                              "matchNames": {"type": "array",
                                                                             "items": {"type": "string"}}}},
                         "endpoints": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "additionalProperties": False,
                             "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                                            "scheme": {"enum": ["http", "https"]},
                                            "interval": {"type": "string", "pattern": _DURATION},
                                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                                            "honorLabels": {"type": "boolean"}}}}}}},
        "additionalProperties": False},
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
            "metadata": _META,
            "spec": {"type": "object", "additionalProperties": False, "properties": {"groups": {
                "type": "array", "items": {
                    "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                    "properties": {"name": {"type": "string", "minLength": 1},
                                   "interval": {"type": "string", "pattern": _DURATION},
                                   "rules": {"type": "array", "items": {
                                       "type": "object", "required": ["expr"], "additionalProperties": False,
                                       "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                                       "properties": {"record": {"type": "string"}, "alert": {"type": "string"},
                                                      "expr": {"type": "string", "minLength": 1},
                                                      "for": {"type": "string", "pattern": _DURATION},
                                                      "labels": _STRMAP, "annotations": _STRMAP}}}}}}}}},
        "additionalProperties": False},
}


def k8s_documents() -> list[tuple[Path, dict]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [(K8S / name, doc) for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def validate_k8s(doc: dict) -> None:
    """Raise if `doc` does not match its schema (kubernetes-validate, strict; the subsets above for CRDs)."""
    import jsonschema
    import kubernetes_validate

    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        jsonschema.validate(doc, CRD_SCHEMAS[key])
    else:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_k8s_manifest_is_valid(name):
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    assert docs
    for doc in docs:
        validate_k8s(doc)


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"]["template"]["spec"]["containers"][0].update(livenesProbe={}),  # typo
    lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="8000"),
    lambda d: d["spec"].update(replicas="two"),
])
def test_k8s_validation_rejects_broken_deployments(mutate):
    import kubernetes_validate

    doc = copy.deepcopy(yaml.safe_load((K8S / "deployment.yaml").read_text()))
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(doc)


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"]["endpoints"][0].update(interval="15 seconds"),
    lambda d: d["spec"]["endpoints"][0].update(prot="http"),
    lambda d: d["spec"].pop("selector"),
])
def test_crd_validation_rejects_broken_servicemonitors(mutate):
    import jsonschema

    doc = copy.deepcopy(yaml.safe_load((K8S / "servicemonitor.yaml").read_text()))
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(doc)


def test_deployment_serves_the_verified_cpu_path_with_probes_and_the_shared_store():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_documents()}
    dep = docs[("Deployment", "kvcat")]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "kvcat:cpu" and "nvidia.com/gpu" not in str(dep)  # CUDA is unverified (docs/gpu-status.md)
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["args"][0] == "serve"
    port = c["ports"][0]
    claim = {v["name"]: v for v in pod["volumes"]}["contexts"]["persistentVolumeClaim"]["claimName"]
    pvc = docs[("PersistentVolumeClaim", claim)]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "replicas share the context store"
    mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["contexts"]
    assert mount in c["args"], "the server's store folder is the mounted volume"
    svc = docs[("Service", "kvcat")]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]
    mon = docs[("ServiceMonitor", "kvcat")]
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert mon["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"
    cm = docs[("ConfigMap", "kvcat-config")]
    assert {e["configMapRef"]["name"] for e in c["envFrom"]} == {cm["metadata"]["name"]}
    # the ServiceMonitor's job label gives job="kvcat", which KvcatServerDown selects
    job = dep["metadata"]["labels"][mon["spec"]["jobLabel"]]
    assert 'job="kvcat"' in {r["alert"]: r for r in rules("alert")}["KvcatServerDown"]["expr"] and job == "kvcat"

