"""A trial's saved model goes into its own MLflow run (found by its trial-id tag, or made
when MLflow never showed it), with tags that say what data it trained on and the data
file's SHA-256; without a tracking URI nothing is logged. Real MLflow store in tmp_path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from stagetune.contract.spec import parse_runner
from stagetune.trainer.assignment import Assignment
from stagetune.trainer.model_upload import content_sha256, data_tags, upload_saved_model


def assignment(tmp_path: Path, runner: dict[str, object], trial_id: int = 7) -> Assignment:
    return Assignment(
        trial_id=trial_id,
        study_name="life.sft",
        number=0,
        attempt=1,
        stage="sft",
        params={},
        runner=runner,
        rung_steps=[2, 4],
        objectives=["eval_loss"],
        output_dir=str(tmp_path / "out"),
        result_path=str(tmp_path / "out" / "result.json"),
    )


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "out" / "model"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "completion": "2"}) + "\n")
    return path


def runner_with(data_file: Path) -> dict[str, object]:
    return {"model": {"name_or_path": "base"}, "data": {"path": str(data_file)}}


def test_the_model_lands_in_the_trials_run_with_its_data_tags(
    tmp_path: Path, model: Path, data_file: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("stagetune/sft")
    client.create_run(exp, tags={"stagetune.trial_id": "6"})  # another trial's run
    run = client.create_run(exp, tags={"stagetune.trial_id": "7"})
    runner = runner_with(data_file)
    a = assignment(tmp_path, runner)
    got = upload_saved_model(a, parse_runner("sft", runner), model, tracking_uri=uri)
    assert got == run.info.run_id
    files = sorted(f.path for f in client.list_artifacts(got, "model"))
    assert files == ["model/config.json", "model/model.safetensors"]
    tags = client.get_run(got).data.tags
    assert tags["stagetune.data.source"] == str(data_file.resolve())
    assert tags["stagetune.data.sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert json.loads(tags["stagetune.data.split"])["fractions"] == [0.8, 0.1, 0.1]


def test_a_trial_whose_run_never_showed_makes_one_the_server_finds_by_tag(
    tmp_path: Path, model: Path, data_file: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runner = runner_with(data_file)
    got = upload_saved_model(
        assignment(tmp_path, runner, trial_id=9),
        parse_runner("sft", runner),
        model,
        tracking_uri=uri,
        wait_seconds=0,
    )
    assert got is not None
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("stagetune/sft")
    assert exp is not None
    (found,) = client.search_runs([exp.experiment_id], "tags.`stagetune.trial_id` = '9'")
    assert found.info.run_id == got
    assert client.list_artifacts(got, "model")


def test_without_a_tracking_uri_nothing_is_logged(
    tmp_path: Path, model: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = runner_with(data_file)
    a = assignment(tmp_path, runner)
    assert upload_saved_model(a, parse_runner("sft", runner), model) is None


def test_data_hashes_follow_the_content(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "a.arrow").write_bytes(b"one")
    (folder / "b.json").write_text("{}")
    before = content_sha256(folder)
    (folder / "a.arrow").write_bytes(b"two")
    assert content_sha256(folder) != before
    synthetic = parse_runner(
        "sft", {"model": {"name_or_path": "base"}, "data": {"synthetic": "arithmetic"}}
    ).data
    tags = data_tags(synthetic)
    assert tags["stagetune.data.source"] == "synthetic:arithmetic"
    assert "stagetune.data.sha256" not in tags  # made in code: no file to hash
