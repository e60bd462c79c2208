"""The MLflow UI on a finished study, in a real browser: what a reviewer opens first.

A live server tracks a study of six trials to a real MLflow store; ``mlflow server`` is
started on that store as its own process and Playwright drives Debian's Chromium through
it: the study's parent run with its trials as child runs, the front filter typed into the
runs search box, the hypervolume chart and the front plot among the parent's artifacts.
Screenshots of each page go to the test's folder and to test-artifacts/.

Skipped only where Chromium is not installed (``apt-get install -y chromium``); Playwright
is never asked to download a browser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.spec import StudySpec
from stagetune.server.app import StagetuneServer
from stagetune.v1 import types_pb2 as pb
from tests.conftest import objective_metrics
from tests.ui_servers import CHROMIUM, keep_artifact, mlflow_server

# (eval_loss, decode_latency_ms, peak_memory_mb) in completion order. The first fixes the
# hypervolume reference at twice its values, so each later trial lands inside it and the
# curve climbs; at the end trials 2, 4 and 5 are the front, and 0, 1 and 3 are each
# dominated by one of them.
RESULTS = [
    (3.0, 8.0, 100.0),
    (2.5, 9.5, 120.0),
    (2.0, 6.0, 100.0),
    (4.0, 5.0, 110.0),
    (1.0, 9.0, 100.0),
    (3.0, 4.0, 100.0),
]
FRONT = {2, 4, 5}
FRONT_FILTER = "tags.pareto_front = 'true'"


@dataclasses.dataclass(frozen=True)
class TrackedStudy:
    experiment_id: str
    parent_run: str
    trial_runs: dict[int, str]  # trial number -> child run id
    hypervolumes: list[tuple[int, float]]  # (completed trials, hypervolume) as logged


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")
    # The first page load compiles MLflow's bundle: seconds on a busy 2-core runner.
    expect.set_options(timeout=30_000)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


def run_study(server: StagetuneServer, spec: StudySpec) -> TrackedStudy:
    """Six trials through the worker API, each reporting two rungs, then its metrics."""
    with StudyClient(server.address) as sc, WorkerClient(server.address) as wc:
        study, _ = sc.create_study(spec)
        for loss, latency, memory in RESULTS:
            lease = wc.acquire("w1")
            for step, extra in ((8, 1.0), (16, 0.5)):
                wc.report_progress(lease.trial.trial_id, "w1", step, {"eval_loss": loss + extra})
            wc.complete(lease.trial.trial_id, "w1", objective_metrics(loss, latency, memory))
        assert sc.get_study(spec.name).state == pb.STUDY_STATE_DONE
    server.tracker.flush()
    client = MlflowClient(server.settings.resolved_tracking_uri())
    runs = client.search_runs(
        [study.mlflow_experiment_id], filter_string="tags.`stagetune.kind` = 'trial'"
    )
    trial_runs = {int(r.data.tags["trial_number"]): r.info.run_id for r in runs}
    assert sorted(trial_runs) == list(range(len(RESULTS)))
    logged = client.get_metric_history(study.mlflow_run_id, "hypervolume")
    hypervolumes = [(m.step, m.value) for m in sorted(logged, key=lambda m: m.step)]
    return TrackedStudy(study.mlflow_experiment_id, study.mlflow_run_id, trial_runs, hypervolumes)


def link_to(run_id: str) -> str:
    return f'a[href$="/runs/{run_id}"]'


def run_link(page: Page, run_id: str) -> Locator:
    """The run's name in the runs table: a link to its page."""
    return page.locator(".ag-root").locator(link_to(run_id))


def shoot(page: Page, folder: Path, name: str) -> Path:
    path = folder / f"mlflow-ui-{name}.png"
    page.screenshot(path=path, full_page=True)
    kept = keep_artifact(path)
    print(f"screenshot: {path} (kept as {kept})")
    return path


def test_the_mlflow_ui_shows_the_study_its_trials_the_front_filter_and_hypervolume(
    tmp_path: Path, tracked_server: StagetuneServer, lora_spec: StudySpec, browser: Browser
) -> None:
    budget = dataclasses.replace(lora_spec.budget, max_trials=len(RESULTS))
    study = run_study(
        tracked_server, dataclasses.replace(lora_spec, name="ui-study", budget=budget)
    )
    front_runs = {study.trial_runs[n] for n in FRONT}
    other_runs = set(study.trial_runs.values()) - front_runs
    uri = tracked_server.settings.resolved_tracking_uri()
    with mlflow_server(uri, tmp_path / "mlflow-server") as mlflow:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(30_000)
        experiment = f"{mlflow.url}/#/experiments/{study.experiment_id}"
        try:
            # The runs table: the study's parent run, its six trials nested under it.
            page.goto(f"{experiment}/runs")
            parent = run_link(page, study.parent_run)
            expect(parent).to_have_text("ui-study")
            # Cosmetic, for the screenshots: MLflow 3 opens its assistant beside the page.
            assistant = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
            if assistant.is_visible():
                assistant.click()
            page.locator(".ag-row", has=page.locator(link_to(study.parent_run))).locator(
                '[col-id*="Run Name"] button'
            ).click()
            for number, run_id in study.trial_runs.items():
                expect(run_link(page, run_id)).to_have_text(f"ui-study/trial-{number}")
            shoot(page, tmp_path, "runs")

            # The front filter, typed as a reviewer types it: the front's trials remain.
            search = page.get_by_test_id("search-box")
            search.fill(FRONT_FILTER)
            search.press("Enter")
            for run_id in other_runs:
                expect(run_link(page, run_id)).to_have_count(0)
            for run_id in front_runs:
                expect(run_link(page, run_id)).to_be_visible()
            expect(search).to_have_value(FRONT_FILTER)
            shown = page.locator('.ag-root a[href*="/runs/"]').evaluate_all(
                "links => links.map(a => a.getAttribute('href').split('/runs/')[1])"
            )
            # Only the front's trials, with at most their parent shown to nest them under.
            assert set(shown) - {study.parent_run} == front_runs
            shoot(page, tmp_path, "front-filter")

            # The parent run's hypervolume chart: a point per completed trial, as logged.
            page.goto(f"{experiment}/runs/{study.parent_run}/model-metrics")
            card = page.get_by_test_id("experiment-view-compare-runs-card").filter(
                has_text="hypervolume"
            )
            expect(card.locator(".scatterlayer path.point")).to_have_count(len(RESULTS))
            plotted = card.locator(".js-plotly-plot").evaluate(
                "chart => chart.data.map(line => [line.x, line.y])"
            )
            # Plotly holds the run's line twice (drawn, and a layer for hovering): one curve.
            curves = {tuple(zip(x, y, strict=True)) for x, y in plotted}
            assert curves == {tuple(study.hypervolumes)}
            steps, values = zip(*study.hypervolumes, strict=True)
            assert steps == tuple(range(1, len(RESULTS) + 1))
            assert list(values) == sorted(values) and values[-1] > values[0]  # it climbs
            shoot(page, tmp_path, "hypervolume")

            # The front plot among the parent's artifacts, previewed.
            page.goto(f"{experiment}/runs/{study.parent_run}/artifacts")
            page.get_by_text("pareto_front.csv", exact=True).wait_for()
            page.get_by_text("pareto_front.png", exact=True).click()
            plot = page.get_by_alt_text("pareto_front.png", exact=True)
            expect(plot).to_be_visible()
            assert plot.evaluate("img => img.complete && img.naturalWidth") > 0  # decoded
            shoot(page, tmp_path, "front-plot")
        except Exception:
            shoot(page, tmp_path, "failure")
            print(mlflow.log_tail())
            raise
