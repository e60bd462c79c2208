"""deploy/monitoring/ checked offline: promtool on the scrape configs and the alert rules
(with the rules' own unit tests), and every metric the rules and the Grafana dashboard query
checked against a live scrape of a real server, so a renamed metric fails here rather than
as an empty panel or an alert that can never fire. The deploy files that point Prometheus at
the server (compose, pod annotations, Service) are checked against the port the server's
command really serves, parsed by the real CLI parser.

promtool comes from Debian's ``prometheus`` package (the setup extracts the binary; the
daemon is never started). Debian builds it without Kubernetes service discovery, so
prometheus-kubernetes.yml is checked with its discovery block swapped for a static target
there; a promtool that has it checks the file as it is.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.spec import BudgetSpec, StudySpec, load_spec_file
from stagetune.server.app import StagetuneServer
from tests.conftest import REPO, objective_metrics, start_server
from tests.deploy_manifests import (
    DEPLOY,
    by_kind,
    compose,
    compose_services,
    k8s_roles,
    run,
    stagetune_args,
    tool,
)
from tests.metrics_scrape import Scrape, scrape

MONITORING = DEPLOY / "monitoring"
DASHBOARD = MONITORING / "grafana" / "stagetune.json"
PROVISIONING = MONITORING / "grafana" / "provisioning"
# Series Prometheus makes itself, not the server.
PROMETHEUS_OWN = {"up"}


def promtool() -> str:
    return tool("promtool", "Debian prometheus: the setup extracts promtool from it")


# ------------------------------------------------------------------ promtool


def test_promtool_accepts_the_compose_scrape_config_and_the_rules_it_loads() -> None:
    done = run([promtool(), "check", "config", str(MONITORING / "prometheus.yml")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout  # alerts.yml, loaded through rule_files


def test_promtool_accepts_the_kubernetes_scrape_config(tmp_path: Path) -> None:
    source = MONITORING / "prometheus-kubernetes.yml"
    done = run([promtool(), "check", "config", str(source)])
    if "field kubernetes_sd_configs not found" in done.stdout + done.stderr:
        # Debian's promtool has no Kubernetes discovery: check the rest of the file.
        config = yaml.safe_load(source.read_text())
        (job,) = config["scrape_configs"]
        assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
        del job["kubernetes_sd_configs"]
        job["static_configs"] = [{"targets": ["10.0.0.7:9464"]}]
        (tmp_path / "alerts.yml").write_text((MONITORING / "alerts.yml").read_text())
        swapped = tmp_path / "prometheus-kubernetes.yml"
        swapped.write_text(yaml.safe_dump(config))
        done = run([promtool(), "check", "config", str(swapped)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    done = run([promtool(), "check", "rules", str(MONITORING / "alerts.yml")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_expect() -> None:
    done = run([promtool(), "test", "rules", str(MONITORING / "alerts.test.yml")])
    assert done.returncode == 0, done.stdout + done.stderr
    tests = yaml.safe_load((MONITORING / "alerts.test.yml").read_text())["tests"]
    tested = {
        case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]
    }
    assert tested == {rule["alert"] for rule in alert_rules()}, "an alert without a firing test"


def test_a_wrong_expectation_fails_the_rule_tests(tmp_path: Path) -> None:
    (tmp_path / "alerts.yml").write_text((MONITORING / "alerts.yml").read_text())
    text = (MONITORING / "alerts.test.yml").read_text()
    (tmp_path / "t.yml").write_text(text.replace("takes 4.975s (p99)", "takes 1s (p99)"))
    done = run([promtool(), "test", "rules", str(tmp_path / "t.yml")])
    assert done.returncode != 0 and "StagetuneAcquireSlow" in done.stdout + done.stderr


# ------------------------------------------------------------------ queries against a scrape


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    """A scrape of a real server after a little real work (one trial completed)."""
    folder = tmp_path_factory.mktemp("monitored")
    srv: StagetuneServer = start_server(folder, tracking_uri="", metrics_port=0)
    spec: StudySpec = dataclasses.replace(
        load_spec_file(REPO / "configs" / "lora.yaml"), budget=BudgetSpec(2, 0)
    )
    try:
        with StudyClient(srv.address) as sc, WorkerClient(srv.address) as wc:
            sc.create_study(spec)
            a = wc.acquire("w")
            wc.report_progress(a.trial.trial_id, "w", 8, {"eval_loss": 2.0})
            wc.complete(a.trial.trial_id, "w", objective_metrics(1.0, 2.0, 3.0))
        yield scrape(srv.settings.host, srv.metrics_port)
    finally:
        srv.stop(grace=0)


_KEYWORDS = {
    *("by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"),
    *("and", "or", "unless", "inf", "nan"),
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: label matchers, ranges, string
    literals, grouping lists and function calls taken out first."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\b(\s*\()?", expr):
        if m.group(2) is None and m.group(1) not in _KEYWORDS:
            names.add(m.group(1))
    return names


def test_metric_names_reads_selectors_not_functions_labels_or_grouping() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (grpc_method, le) (rate(grpc_server_handling_seconds_"
        'bucket{job="stagetune", grpc_code!="OK"}[$__rate_interval]))) / on(instance) '
        'group_left up{job="x"} > 2 and absent(stagetune_store_up) or vector(1)'
    )
    assert metric_names(expr) == {"grpc_server_handling_seconds_bucket", "up", "stagetune_store_up"}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            queries.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(SELECTOR, label): Grafana's, not PromQL
            found = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
            assert found, variable["definition"]
            queries.append(found.group(1))
    return queries


def test_every_metric_the_alerts_and_the_dashboard_query_is_served(live: Scrape) -> None:
    served = live.names | PROMETHEUS_OWN
    queries = [rule["expr"] for rule in alert_rules()] + dashboard_queries()
    named = set()
    for query in queries:
        names = metric_names(query)
        assert names, f"no metric in {query!r}"
        assert names <= served, f"{sorted(names - served)} in {query!r} are not served"
        named |= names
    # What an operator most needs is watched somewhere.
    for needed in (
        "stagetune_trials",
        "stagetune_study_hypervolume",
        "stagetune_study_front_size",
        "stagetune_acquire_seconds_bucket",
        "stagetune_complete_seconds_bucket",
        "stagetune_rung_decisions_total",
        "stagetune_lease_expiries_total",
        "stagetune_trial_requeues_total",
        "stagetune_suggestion_pool_misses_total",
        "stagetune_tracking_backlog",
        "stagetune_tracking_errors_total",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
    ):
        assert needed in named, needed


def test_the_scrape_passes_promtools_metric_lint(live: Scrape) -> None:
    done = run([promtool(), "check", "metrics"], stdin=live.text)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_the_dashboard_uses_its_data_source_variable_and_fits_the_grid() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
            assert panel["description"], panel["title"]


# ------------------------------------------------------------------ deploy files agree


def test_compose_prometheus_scrapes_the_port_the_server_serves_metrics_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose_services()
    server = services["stagetune"]
    serve = stagetune_args(server.argv, server.env, monkeypatch)
    assert serve.metrics_port and serve.host == "0.0.0.0"
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "stagetune"  # what the rules and the dashboard select
    assert job["static_configs"][0]["targets"] == [f"stagetune:{serve.metrics_port}"]
    spec = compose()["services"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in spec["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./monitoring/prometheus.yml"
    for rule_file in config["rule_files"]:  # relative to the config: mounted beside it
        assert mounts[f"/etc/prometheus/{rule_file}"] == f"./monitoring/{rule_file}"
    # Grafana: the provisioned data source is that Prometheus, the dashboard where loaded.
    listen = next(a for a in spec["prometheus"]["command"] if a.startswith("--web.listen"))
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus:{listen.rsplit(':', 1)[1]}"
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "stagetune.yml").read_text())[
        "providers"
    ]
    grafana = {v.split(":")[1]: v.split(":")[0] for v in spec["grafana"]["volumes"]}
    assert grafana[f"{provider['options']['path']}/stagetune.json"] == (
        "./monitoring/grafana/stagetune.json"
    )


@pytest.mark.parametrize("folder", ["overlays/sqlite", "overlays/postgres"])
def test_k8s_pods_announce_the_port_the_server_serves_metrics_on(
    folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects, roles = k8s_roles(folder, monkeypatch)
    server = roles["serve"]
    port = server.args.metrics_port
    assert port and port != server.args.port
    named = {p["name"]: p["containerPort"] for p in server.container["ports"]}
    assert named["metrics"] == port
    (deployment,) = by_kind(objects, "Deployment")
    template = deployment["spec"]["template"]["metadata"]
    annotations = template["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"
    (svc,) = by_kind(objects, "Service")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert named[ports["metrics"]["targetPort"]] == port
    # The scrape config keeps exactly these pods: the labels it matches are theirs.
    config = yaml.safe_load((MONITORING / "prometheus-kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    keep = job["relabel_configs"][0]
    labels = [s.removeprefix("__meta_kubernetes_pod_label_") for s in keep["source_labels"]]
    values = keep["regex"].split(";")
    pod_labels = {k.replace(".", "_").replace("/", "_"): v for k, v in template["labels"].items()}
    assert all(pod_labels[k] == v for k, v in zip(labels, values, strict=True))
