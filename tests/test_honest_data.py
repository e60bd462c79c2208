"""Honest evaluation inside a trial: every source is split train / eval / test by content,
the splits are checked for overlap before training, a training trial reads train and eval
only, and an evaluation trial (``runner.evaluate``) reads only the split it scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec import DEFAULT_MAX_OVERLAP, DataSource, parse_runner
from stagetune.trainer.assignment import TrialResult
from stagetune.trainer.overlap import DEFAULT_MAX_FRACTION, OverlapRefused
from stagetune.trainer.splits import SplitSpec, example_key, read_rows, split_rows
from stagetune.trainer.tasks import SplitNotAllowed, TrialData, prepare_splits
from tests.conftest import SHARED_DATA
from tests.test_stages import QUALITY, TINY, assignment

TIMING = ("decode_latency_ms", "peak_memory_mb", "device_seconds")


def arithmetic_file(path: Path, n: int = 200) -> Path:
    """A JSONL file of distinct additions (column names of the team's choosing)."""
    rows = [{"q": f"What is {i} plus {i + 7}?", "a": str(2 * i + 7)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def file_source(path: Path, **sizes: int) -> DataSource:
    data = {"path": str(path), "prompt_columns": ["q"], "completion_column": "a", **sizes}
    return parse_runner("sft", {"model": {"tiny": TINY}, "data": data}).data


def keys_by_split(path: Path) -> dict[str, set[str]]:
    """Each split's example keys, computed apart from the loader (prompt column as key)."""
    spec = SplitSpec(fields=("q",))
    return {
        name: {example_key(r, ("q",))[:16] for r in rows}
        for name, rows in split_rows(read_rows(path), spec).items()
    }


def ledger(a: Any) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((Path(a.output_dir) / "data-rank-0.json").read_text())
    return record


# ---------------------------------------------------------------- splits and overlap


def test_a_files_held_out_rows_do_not_depend_on_the_training_size(tmp_path: Path) -> None:
    path = arithmetic_file(tmp_path / "sums.jsonl")
    small = prepare_splits("sft", file_source(path, train_size=10, eval_size=5))
    large = prepare_splits("sft", file_source(path, train_size=100, eval_size=5))
    assert small.rows["eval"] == large.rows["eval"] and small.rows["test"] == large.rows["test"]
    assert large.rows["train"][:10] == small.rows["train"]
    expected = keys_by_split(path)
    for name in ("train", "eval", "test"):
        assert {k[:16] for k in large.keys[name]} <= expected[name]


def test_the_default_overlap_limit_is_one_value() -> None:
    assert DEFAULT_MAX_OVERLAP == DEFAULT_MAX_FRACTION == DataSource().max_overlap == 0.02


def test_gsm8k_passes_the_default_limit_and_its_near_duplicates_are_dropped() -> None:
    path = SHARED_DATA / "gsm8k-train-alpaca.json"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    data = {"path": str(path), "prompt_columns": ["instruction", "input"]}
    data["completion_column"] = "output"
    source = parse_runner("sft", {"model": {"tiny": TINY}, "data": data}).data
    prepared = prepare_splits("sft", source)
    # Keyed on the prompt: no exact duplicates across splits; rephrased problems share a
    # 13-gram with train in ~1.3% of eval and ~1.1% of test rows.
    fractions = {f"{p.held_out}/{p.reference}": (p.exact, p.near) for p in prepared.overlap.pairs}
    assert fractions == {"eval/train": (0, 10), "test/train": (0, 8), "test/eval": (0, 2)}
    assert dict(prepared.dropped) == {"train": 0, "eval": 10, "test": 10}
    metrics = prepared.metrics()
    assert metrics["overlap.eval_vs_train.fraction"] == pytest.approx(10 / 775)
    assert metrics["overlap.dropped.test"] == 10


def test_hh_rlhf_splits_by_its_opening_turn_and_split_row_by_row_is_refused() -> None:
    # Dialogues that open with the same human turn share their first 13-grams: keyed on
    # that turn (the default with no prompt columns) they share a split; keyed row by row,
    # 7% of eval and 9% of test rows overlap train.
    path = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    runner: dict[str, Any] = {"model": {"tiny": TINY}, "data": {"path": str(path)}}
    prepared = prepare_splits("preference", parse_runner("dpo", runner).data)
    assert all(p.overlapping == 0 for p in prepared.overlap.pairs)
    runner["data"]["split"] = {"fields": ["chosen", "rejected"]}
    with pytest.raises(OverlapRefused) as refused:
        prepare_splits("preference", parse_runner("dpo", runner).data)
    message = str(refused.value)
    assert message.startswith("data overlap between splits above runner.data.max_overlap=0.02")
    assert "eval vs train: 15 of 215 rows (6.98%)" in message and "\n" not in message


def test_a_duplicate_laden_file_fails_the_trial_before_training_in_one_line(
    tmp_path: Path,
) -> None:
    rows = [
        {"q": f"Problem {i}: " + " ".join(f"w{i}x{j}" for j in range(20)), "a": str(i)}
        for i in range(100)
    ]
    rows += [{"q": r["q"].upper() + "!", "a": r["a"]} for r in rows[:30]]  # re-posted
    path = tmp_path / "scraped.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = assignment(
        tmp_path, "sft", data={"path": str(path), "prompt_columns": ["q"], "completion_column": "a"}
    )
    spec = tmp_path / "assignment.json"
    Path(a.result_path).parent.mkdir(parents=True, exist_ok=True)
    a.write(spec)
    done = subprocess.run(
        [sys.executable, "-m", "stagetune.trainer.run_trial", str(spec)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = TrialResult.read(Path(a.result_path))
    assert done.returncode == 2 and result.status == "error"
    assert result.reason.startswith(
        "invalid config: data overlap between splits above runner.data.max_overlap=0.02: "
    )
    assert "exact duplicates" in result.reason and "\n" not in result.reason
    assert not Path(a.output_dir).exists()  # refused before any model or data was loaded


# ---------------------------------------------------------------- who may read what


def test_a_training_trial_cannot_read_test_and_an_evaluation_reads_only_its_split(
    tmp_path: Path,
) -> None:
    prepared = prepare_splits("sft", file_source(arithmetic_file(tmp_path / "s.jsonl")))
    training = TrialData(prepared, "train", tmp_path / "train.json")
    assert len(training.dataset("train")) and len(training.dataset("eval"))
    with pytest.raises(SplitNotAllowed):
        training.dataset("test")
    scoring = TrialData(prepared, "test", tmp_path / "test.json")
    for split in ("train", "eval"):
        with pytest.raises(SplitNotAllowed):
            scoring.dataset(split)
    scoring.dataset("test")
    assert sorted(json.loads((tmp_path / "train.json").read_text())["read"]) == ["eval", "train"]
    assert list(json.loads((tmp_path / "test.json").read_text())["read"]) == ["test"]
    assert {k for k in scoring.metrics() if k.startswith("data.")} == {"data.test_rows"}


@pytest.mark.parametrize(
    ("runner", "field"),
    [
        ({"evaluate": "train"}, "runner.evaluate"),
        (
            {"data": {"synthetic": "arithmetic", "split": {"fractions": {"eval": 0.5}}}},
            "runner.data.split.fractions",
        ),
        (
            {"data": {"synthetic": "arithmetic", "split": {"fractions": {"dev": 0.1}}}},
            "runner.data.split.fractions.dev",
        ),
        (
            {"data": {"synthetic": "arithmetic", "split": {"fields": "q"}}},
            "runner.data.split.fields",
        ),
        ({"data": {"synthetic": "arithmetic", "max_overlap": 2}}, "runner.data.max_overlap"),
        ({"data": {"synthetic": "arithmetic", "test_size": 0}}, "runner.data.test_size"),
        (
            {
                "evaluate": "test",
                "data": {
                    "synthetic": "arithmetic",
                    "split": {"fractions": {"train": 0.9, "eval": 0.1, "test": 0.0}},
                },
            },
            "runner.data.split.fractions.test",
        ),
        ({"reference_model": {"tiny": TINY}}, "runner.reference_model"),  # sft has none
    ],
)
def test_bad_split_and_evaluation_settings_name_the_field(
    runner: dict[str, Any], field: str
) -> None:
    section = {"model": {"tiny": TINY}, "data": {"synthetic": "arithmetic"}, **runner}
    with pytest.raises(InvalidArgument) as err:
        parse_runner("sft", section)
    assert err.value.field == field


# ---------------------------------------------------------------- trials on tiny models


def run_stage(a: Any) -> TrialResult:
    from stagetune.trainer.run_trial import _runner
    from stagetune.trainer.rungs import NullReporter

    runner = _runner(a.stage)
    assert runner is not None
    result: TrialResult = runner(a, NullReporter())
    assert result.status == "complete", result.reason
    return result


@pytest.mark.slow
def test_a_training_trial_reads_train_and_eval_rows_and_no_test_row(tmp_path: Path) -> None:
    path = arithmetic_file(tmp_path / "sums.jsonl")
    data = {
        "path": str(path),
        "prompt_columns": ["q"],
        "completion_column": "a",
        "train_size": 16,
        "eval_size": 4,
    }
    a = assignment(tmp_path / "t", "sft", data=data)
    result = run_stage(a)
    assert result.metrics["data.train_rows"] == 16 and result.metrics["data.eval_rows"] == 4
    assert "data.test_rows" not in result.metrics
    record = ledger(a)
    expected = keys_by_split(path)
    assert record["mode"] == "train" and sorted(record["read"]) == ["eval", "train"]
    assert set(record["read"]["train"]["keys"]) <= expected["train"]
    assert set(record["read"]["eval"]["keys"]) <= expected["eval"]
    read = set(record["read"]["train"]["keys"]) | set(record["read"]["eval"]["keys"])
    assert not read & expected["test"]


@pytest.mark.slow
def test_an_evaluation_scores_the_trained_model_on_test_without_training(
    tmp_path: Path,
) -> None:
    path = arithmetic_file(tmp_path / "sums.jsonl")
    data = {
        "path": str(path),
        "prompt_columns": ["q"],
        "completion_column": "a",
        "train_size": 16,
        "eval_size": 4,
        "test_size": 6,
    }
    trained = assignment(tmp_path / "train", "sft", data=data, save_model=True)
    result = run_stage(trained)
    model = {"name_or_path": str(Path(trained.output_dir) / "model")}
    # Scoring the saved model on eval gives back the trial's own final eval loss: the
    # evaluation measures what the trial measured.
    again = run_stage(assignment(tmp_path / "eval", "sft", data=data, model=model, evaluate="eval"))
    assert again.metrics["eval_loss"] == result.metrics["eval_loss"]
    scored = assignment(tmp_path / "test", "sft", data=data, model=model, evaluate="test")
    on_test = run_stage(scored)
    assert on_test.rungs == [] and on_test.metrics["data.test_rows"] == 6
    assert not {"data.train_rows", "data.eval_rows"} & set(on_test.metrics)
    assert on_test.metrics["eval_loss"] != result.metrics["eval_loss"]
    record = ledger(scored)
    assert record["mode"] == "test" and list(record["read"]) == ["test"]
    assert set(record["read"]["test"]["keys"]) <= keys_by_split(path)["test"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(QUALITY))
def test_every_stage_evaluates_on_test_with_every_objective(stage: str, tmp_path: Path) -> None:
    runner: dict[str, Any] = {"evaluate": "test"}
    if stage == "dpo":
        runner["reference_model"] = {"tiny": TINY}
    if stage == "grpo":
        runner["training"] = {"reward_functions": ["has_number"], "max_completion_length": 4}
    a = assignment(tmp_path, stage, **runner)
    result = run_stage(a)
    for key in (QUALITY[stage], *TIMING, "seed", "overlap.test_vs_train.fraction"):
        assert key in result.metrics, key
    assert result.metrics["data.test_rows"] == 8  # test_size defaults to eval_size
    assert ledger(a)["read"].keys() == {"test"}


def test_evaluating_a_dpo_model_needs_the_model_it_was_trained_from(tmp_path: Path) -> None:
    from stagetune.trainer.rungs import NullReporter
    from stagetune.trainer.stages.dpo import run_dpo

    with pytest.raises(InvalidArgument) as err:
        run_dpo(assignment(tmp_path, "dpo", evaluate="test"), NullReporter())
    assert err.value.field == "runner.reference_model"
