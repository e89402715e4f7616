"""deploy/docker and docker-compose.yml: the Dockerfiles copy what exists and run `kvcat serve`, the compose
file passes the Compose spec's strict parser and agrees with the Prometheus config, and every flag the
containers and the Deployment pass to `kvcat serve` exists. Fast: no Docker engine, nothing is built."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from deploy_files import DEPLOY, K8S, PROM, REPO


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile(name):
    steps = dockerfile(DEPLOY / "docker" / name)
    known = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK",
             "ENTRYPOINT", "CMD", "LABEL"}
    assert steps[0][0] == "FROM" and "python:3.11" in steps[0][1]
    assert {s for s, _ in steps} <= known
    for instr, args in steps:
        if instr == "COPY":
            *sources, _ = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
    cmd = json.loads(dict(steps)["CMD"])
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["kvcat"] and cmd[0] == "serve"
    assert dict(steps)["EXPOSE"] == cmd[cmd.index("--port") + 1]
    assert "/health" in dict(steps)["HEALTHCHECK"]
    # every package source folder of pyproject.toml is copied in
    import tomllib

    dirs = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = {a.split()[0] for i, a in steps if i == "COPY"}
    assert dirs <= copied, f"{name} misses {dirs - copied}"
    if name.endswith("cuda"):
        assert "vllm==" in dict((i, a) for i, a in steps if i == "RUN" and "vllm" in a)["RUN"]


def test_compose_file_is_valid_and_consistent():
    from compose_spec import PyCompose

    text = (DEPLOY / "docker-compose.yml").read_text()
    compose = PyCompose.from_yaml(text)
    assert {"kvcat", "prometheus", "grafana"} <= set(compose.service_names())
    doc = yaml.safe_load(text)
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
        if "build" in svc:
            assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    target = {j["job_name"]: j for j in prom["scrape_configs"]}["kvcat"]["static_configs"][0]["targets"][0]
    host, port = target.split(":")
    server = doc["services"][host]
    assert server["command"][server["command"].index("--port") + 1] == port
    assert any(d["capabilities"] == ["gpu"]
               for d in doc["services"]["kvcat-cuda"]["deploy"]["resources"]["reservations"]["devices"])


def test_compose_validation_is_not_vacuous():
    from compose_spec import PyCompose

    text = (DEPLOY / "docker-compose.yml").read_text().replace("    ports:\n", "    portz:\n", 1)
    with pytest.raises(Exception):
        PyCompose.from_yaml(text)


def test_deploy_commands_match_the_server_cli():
    """The flags the containers pass to `kvcat serve` exist."""
    from typer.testing import CliRunner

    from kvcat import cli

    cli._register_packages()
    out = CliRunner().invoke(cli.app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    used = set()
    for svc in compose["services"].values():
        if svc.get("command", [""])[0] == "serve":
            used |= {a for a in svc["command"] if a.startswith("--")}
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        used |= {a for a in json.loads(dict(dockerfile(DEPLOY / "docker" / name))["CMD"]) if a.startswith("--")}
    dep = yaml.safe_load((K8S / "deployment.yaml").read_text())
    used |= {a for a in dep["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--")}
    missing = sorted(f for f in used if f not in out)
    assert not missing, f"`kvcat serve` has no {missing}:\n{out}"

