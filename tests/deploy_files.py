"""What the test_deploy_* modules share: deploy/'s paths, the deploy tooling (deploy/tools/, loaded by path as
`kvcat dashboard` loads it) and the Prometheus rules it generates."""

from __future__ import annotations

from pathlib import Path

from kvcat.bench import deploy_tools

dashboard, generate, preview = (deploy_tools(m) for m in ("dashboard", "generate", "preview"))  # deploy/tools/

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROM = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"

rule_groups = generate.rule_groups


def rules(kind: str) -> list[dict]:
    """Every rule of the generated rule files that has `kind` ("alert" or "record")."""
    return [r for g in rule_groups() for r in g["rules"] if kind in r]
