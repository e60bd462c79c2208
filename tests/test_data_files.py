"""The data file a study names is checked where it is meant to be, never on the server:
the server answers a spec the same whether its ``runner.data.path`` names a file on the
server's disk or nothing at all, while ``stagetune submit`` checks the file on the
submitting machine and the trial process checks it on the worker, naming the field."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stagetune.contract.client import StudyClient
from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec import spec_from_mapping, spec_from_proto, spec_to_proto
from stagetune.server.app import StagetuneServer
from stagetune.trainer.assignment import TrialResult
from tests.conftest import REPO, start_server
from tests.test_cli import stagetune
from tests.test_stages import assignment

SECRET_COLUMNS = {"ssn_of_team_b": "123", "salary_of_team_b": "456"}


def dpo_config(name: str, path: Path, **training: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "configs" / "dpo.yaml").read_text())
    data["name"] = name
    data["runner"]["data"] = {"path": str(path), "chosen_column": "good"}
    data["runner"]["training"].update(training)
    return data


def jsonl_gz(path: Path, row: dict[str, str]) -> Path:
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(row) + "\n")
    return path


def server_side_paths(tmp_path: Path) -> dict[str, Path]:
    """Paths on the server's own disk, and paths that name nothing there."""
    folder = tmp_path / "team-b"
    folder.mkdir()
    return {
        "file-with-other-columns": jsonl_gz(folder / "pairs.jsonl.gz", SECRET_COLUMNS),
        "missing-file": folder / "absent.jsonl.gz",
        "existing-folder": folder,
        "missing-folder": tmp_path / "no-such-folder",
        "existing-non-data-file": jsonl_gz(folder / "passwd", SECRET_COLUMNS),
    }


def test_a_valid_spec_is_accepted_alike_whatever_its_path_names_on_the_server(
    server: StagetuneServer, tmp_path: Path
) -> None:
    with StudyClient(server.address, timeout=10, retries=0) as client:
        for i, (kind, path) in enumerate(server_side_paths(tmp_path).items()):
            sent = spec_from_mapping(dpo_config(f"probe-{i}", path))
            study, created = client.create_study(spec_to_proto(sent))
            assert created, kind
            assert spec_from_proto(study.spec) == sent, kind  # nothing added about the file
            assert not any(column in str(study) for column in SECRET_COLUMNS), kind


def test_a_refused_spec_gets_one_answer_whatever_its_path_names_on_the_server(
    server: StagetuneServer, tmp_path: Path
) -> None:
    answers = {}
    with StudyClient(server.address, timeout=10, retries=0) as client:
        for kind, path in server_side_paths(tmp_path).items():
            bad = dpo_config("probe", path, zero_stage=4)
            with pytest.raises(InvalidArgument) as err:
                client.create_study(spec_to_proto(spec_from_mapping(bad)))
            answers[kind] = (err.value.field, err.value.message)
        assert client.list_studies() == []
    assert set(answers.values()) == {
        (
            "runner.training.zero_stage",
            "runner.training.zero_stage: must be one of [0, 1, 2, 3], got 4",
        )
    }


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[StagetuneServer]:
    srv = start_server(tmp_path, storage_url=f"sqlite:///{tmp_path / 'st.db'}", tracking_uri="")
    yield srv
    srv.stop(grace=0)


def test_submit_refuses_a_local_file_without_a_mapped_column_naming_the_field(
    sqlite_server: StagetuneServer, tmp_path: Path
) -> None:
    pairs = jsonl_gz(tmp_path / "pairs.jsonl.gz", {"good": "a", "bad": "b"})
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(dpo_config("local-check", pairs)))
    result = stagetune("submit", str(config), "--server", sqlite_server.address)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "stagetune submit: runner.data.rejected_column: column 'rejected' not in "
        "pairs.jsonl.gz (columns: ['bad', 'good'])"
    )
    with StudyClient(sqlite_server.address) as client:
        assert client.list_studies() == []


def test_submit_leaves_a_path_this_machine_lacks_to_the_worker(
    sqlite_server: StagetuneServer, tmp_path: Path
) -> None:
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(dpo_config("on-the-worker", tmp_path / "there.jsonl")))
    result = stagetune("submit", str(config), "--server", sqlite_server.address)
    assert result.returncode == 0, result.stderr
    assert "created study on-the-worker" in result.stdout


def run_trial_process(tmp_path: Path, data: dict[str, Any]) -> tuple[int, TrialResult]:
    a = assignment(tmp_path, "sft", data=data)
    path = tmp_path / "assignment.json"
    Path(a.result_path).parent.mkdir(parents=True, exist_ok=True)
    a.write(path)
    done = subprocess.run(
        [sys.executable, "-m", "stagetune.trainer.run_trial", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, TrialResult.read(Path(a.result_path))


def test_a_trial_whose_file_lacks_a_column_fails_in_one_line_naming_the_field(
    tmp_path: Path,
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"q": "What is 1 plus 1?", "a": "2"}) + "\n")
    code, result = run_trial_process(
        tmp_path, {"path": str(rows), "prompt_columns": ["q"], "completion_column": "answer"}
    )
    assert code == 2
    assert result.status == "error"
    assert result.reason == (
        "invalid config: runner.data.completion_column: column 'answer' not in rows.jsonl "
        "(columns: ['a', 'q'])"
    )


def test_a_trial_whose_file_is_missing_on_the_worker_fails_naming_the_path(
    tmp_path: Path,
) -> None:
    code, result = run_trial_process(tmp_path, {"path": str(tmp_path / "gone.jsonl")})
    assert code == 2
    assert result.reason.startswith("invalid config: runner.data.path: ")
    assert "does not exist" in result.reason and "Traceback" not in result.reason
