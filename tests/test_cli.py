"""The stagetune CLI as a user runs it: real processes against a live server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stagetune.contract.client import WorkerClient
from stagetune.server.app import StagetuneServer
from tests.conftest import REPO, objective_metrics


def stagetune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stagetune.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_submit_creates_then_reports_the_existing_study(tracked_server: StagetuneServer) -> None:
    config = str(REPO / "configs" / "lora.yaml")
    first = stagetune("submit", config, "--server", tracked_server.address)
    again = stagetune("submit", config, "--server", tracked_server.address)
    assert first.returncode == 0, first.stderr
    assert "created study demo-lora" in first.stdout
    assert "already exists with this spec" in again.stdout


def test_a_bad_config_gets_one_line_naming_the_field_not_a_traceback(
    tracked_server: StagetuneServer, tmp_path: Path
) -> None:
    text = (REPO / "configs" / "lora.yaml").read_text().replace("low: 1.0e-4", "low: -1.0")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = stagetune("submit", str(bad), "--server", tracked_server.address)
    assert result.returncode == 2
    assert "search_space.learning_rate.low: must be > 0 when log is set" in result.stderr
    assert "Traceback" not in result.stderr
    assert "no studies" in stagetune("status", "--server", tracked_server.address).stdout


def test_an_unsafe_yaml_tag_is_refused(tracked_server: StagetuneServer, tmp_path: Path) -> None:
    bad = tmp_path / "evil.yaml"
    bad.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    result = stagetune("submit", str(bad), "--server", tracked_server.address)
    assert result.returncode == 2 and "not valid YAML" in result.stderr


def test_pareto_json_and_status_show_the_front(tracked_server: StagetuneServer) -> None:
    config = str(REPO / "configs" / "lora.yaml")
    assert stagetune("submit", config, "--server", tracked_server.address).returncode == 0
    with WorkerClient(tracked_server.address) as wc:
        for metrics in [(2.0, 5.0, 100.0), (1.0, 6.0, 100.0), (2.5, 6.5, 120.0)]:
            a = wc.acquire("w1")
            wc.complete(a.trial.trial_id, "w1", objective_metrics(*metrics))
    out = stagetune("pareto", "demo-lora", "--format", "json", "--server", tracked_server.address)
    front = json.loads(out.stdout)
    assert len(front["trials"]) == 2
    assert front["trials"][0]["objectives"] == {
        "eval_loss": 1.0,
        "decode_latency_ms": 6.0,
        "peak_memory_mb": 100.0,
    }
    assert set(front["trials"][0]["params"]) == {
        "learning_rate",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
    }
    assert sum(t["knee"] for t in front["trials"]) == 1
    csv_out = stagetune(
        "pareto", "demo-lora", "--format", "csv", "--server", tracked_server.address
    )
    assert csv_out.stdout.splitlines()[0].startswith("trial_id,number,eval_loss,")
    status = stagetune("status", "demo-lora", "--server", tracked_server.address).stdout
    assert "3 complete" in status and "Pareto front:" in status


def test_unknown_study_is_a_clear_error(tracked_server: StagetuneServer) -> None:
    result = stagetune("pareto", "nope", "--server", tracked_server.address)
    assert result.returncode == 2
    assert result.stderr.strip() == "stagetune pareto: study 'nope' not found"


def test_a_worker_for_a_study_nobody_submitted_exits_with_a_configuration_error(
    tracked_server: StagetuneServer, tmp_path: Path
) -> None:
    # Exit 2, not 0: a Kubernetes Job applied before its study must not count as done.
    result = stagetune(
        "worker",
        "--study",
        "never-submitted",
        "--server",
        tracked_server.address,
        "--work-dir",
        str(tmp_path),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "never-submitted" in result.stderr and "Traceback" not in result.stderr
