"""Every lifecycle stage: configs that validate, bad stage configs refused at submit time,
and each stage's runner on real tiny models (directly and on real data files)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec import (
    load_spec_file,
    parse_runner,
    spec_from_mapping,
    validate_spec,
)
from stagetune.contract.stages import STAGES
from stagetune.trainer.assignment import Assignment
from stagetune.trainer.rungs import NullReporter
from stagetune.trainer.tasks import split_shared_prompt
from tests.conftest import REPO, SHARED_DATA

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
QUALITY = {
    "pretrain_proxy": "eval_loss",
    "sft": "eval_loss",
    "lora": "eval_loss",
    "dpo": "reward_accuracy",
    "grpo": "mean_reward",
}


def config(stage: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "configs" / f"{stage}.yaml").read_text())
    return data


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_has_a_config_that_validates(stage: str) -> None:
    spec = load_spec_file(REPO / "configs" / f"{stage}.yaml")
    validate_spec(spec)
    assert spec.stage == stage
    assert spec.objectives[0].metric == QUALITY[stage]


@pytest.mark.parametrize(
    ("stage", "edit", "field"),
    [
        ("sft", lambda d: d.update(stage="rlhf"), "stage"),
        (
            "dpo",
            lambda d: d["search_space"].update(
                num_generations={"type": "int", "low": 2, "high": 8}
            ),
            "search_space.num_generations",
        ),
        (
            "dpo",
            lambda d: d["search_space"].update(lora_r={"type": "int", "low": -1, "high": 8}),
            "search_space.lora_r.low",
        ),
        (
            "dpo",
            lambda d: d["search_space"].update(beta={"type": "float", "low": 0.0, "high": 1.0}),
            "search_space.beta.low",
        ),
        (
            "dpo",
            lambda d: d["search_space"].update(
                loss_type={"type": "categorical", "choices": ["sigmoid", "bogus"]}
            ),
            "search_space.loss_type.choices[1]",
        ),
        (
            "sft",
            lambda d: d["runner"]["training"].update(zero_stage=4),
            "runner.training.zero_stage",
        ),
        (
            "grpo",
            lambda d: d["search_space"].update(
                num_generations={"type": "categorical", "choices": [3, 4]}
            ),
            "search_space.num_generations",
        ),
        (
            "grpo",
            lambda d: d["runner"]["training"].update(reward_functions=["vibes"]),
            "runner.training.reward_functions",
        ),
        (
            "pretrain_proxy",
            lambda d: d["search_space"].update(hidden_size={"type": "int", "low": 0, "high": 64}),
            "search_space.hidden_size.low",
        ),
        (
            "sft",
            lambda d: d["runner"]["data"].update(chosen_column="chosen"),
            "runner.data.chosen_column",
        ),
    ],
)
def test_bad_stage_configs_are_refused_naming_the_field(stage: str, edit: Any, field: str) -> None:
    data = config(stage)
    edit(data)
    with pytest.raises(InvalidArgument) as err:
        validate_spec(spec_from_mapping(data))
    assert err.value.field == field


def test_hh_rlhf_pairs_split_at_the_last_assistant_turn() -> None:
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: Sure, here."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: Sorry, no."
    prompt, good, bad = split_shared_prompt(chosen, rejected)
    assert prompt.endswith("help?\n\nAssistant:")
    assert (good, bad) == (" Sure, here.", " Sorry, no.")


# ---------------------------------------------------------------- runners on tiny models


def assignment(tmp_path: Path, stage: str, **runner: Any) -> Assignment:
    training = {"per_device_train_batch_size": 4, "max_length": 32}
    training.update(runner.pop("training", {}))
    return Assignment(
        trial_id=1,
        study_name="s",
        number=0,
        attempt=1,
        stage=stage,
        params=runner.pop("params", {}),
        runner={
            "model": {"tiny": TINY},
            "cache_dir": str(tmp_path / "cache"),
            "data": {"synthetic": "arithmetic", "train_size": 32, "eval_size": 8},
            "training": training,
            **runner,
        },
        rung_steps=[2, 4],
        objectives=[QUALITY[stage]],
        output_dir=str(tmp_path / stage / "out"),
        result_path=str(tmp_path / stage / "result.json"),
    )


def run_launched(a: Assignment, processes: int, timeout: float) -> Any:
    """Launch the trial as a CPU worker launches it (accelerate, ``processes`` ranks) and
    return its TrialResult."""
    import os
    import subprocess

    from stagetune.trainer.assignment import TrialResult
    from stagetune.trainer.trial_launch import launch_command, uses_deepspeed

    path = Path(a.result_path).parent / "assignment.json"
    Path(a.output_dir).mkdir(parents=True, exist_ok=True)
    a.write(path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        launch_command(path, processes=processes, cpu=True, deepspeed=uses_deepspeed(a)),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return TrialResult.read(Path(a.result_path))


def run(a: Assignment) -> Any:
    from stagetune.trainer.run_trial import _runner

    runner = _runner(a.stage)
    assert runner is not None
    reporter = NullReporter()
    result = runner(a, reporter)
    assert result.status == "complete", result.reason
    assert [step for step, _ in reporter.calls] == [2, 4]
    quality = QUALITY[a.stage]
    assert all(quality in metrics for _, metrics in reporter.calls)
    for key in ("decode_latency_ms", "peak_memory_mb", "device_seconds", "tokens_per_second"):
        assert result.metrics[key] > 0, key
    return result


@pytest.mark.slow
def test_pretrain_proxy_trains_from_scratch_at_the_trials_width_and_depth(
    tmp_path: Path,
) -> None:
    small = run(
        assignment(tmp_path / "a", "pretrain_proxy", params={"hidden_size": 16, "num_layers": 1})
    )
    big = run(
        assignment(tmp_path / "b", "pretrain_proxy", params={"hidden_size": 48, "num_layers": 2})
    )
    assert small.metrics["parameters_m"] < big.metrics["parameters_m"]
    assert small.metrics["perplexity"] > 1


@pytest.mark.slow
def test_sft_on_gsm8k_reports_loss_and_exact_match(tmp_path: Path) -> None:
    path = SHARED_DATA / "gsm8k-train-alpaca.json"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    data = {
        "path": str(path),
        "prompt_columns": ["instruction", "input"],
        "completion_column": "output",
        "train_size": 24,
        "eval_size": 4,
    }
    result = run(assignment(tmp_path, "sft", data=data, training={"max_length": 512}))
    assert 0 < result.metrics["eval_loss"] < 10
    assert 0.0 <= result.metrics["exact_match"] <= 1.0


@pytest.mark.slow
def test_dpo_on_hh_rlhf_reports_reward_accuracy_and_margin(tmp_path: Path) -> None:
    path = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    data = {"path": str(path), "train_size": 16, "eval_size": 4}
    # The tiny model's tokenizer has a token per character: most hh-rlhf prompts are longer
    # than 256, and trl drops a pair whose prompt fills max_length.
    result = run(assignment(tmp_path, "dpo", data=data, training={"max_length": 1024}))
    assert 0.0 <= result.metrics["reward_accuracy"] <= 1.0
    assert "reward_margin" in result.metrics


@pytest.mark.slow
def test_grpo_scores_held_out_prompts_with_the_configured_rewards(tmp_path: Path) -> None:
    result = run(
        assignment(
            tmp_path,
            "grpo",
            params={"num_generations": 2, "beta": 0.04},
            training={"reward_functions": ["has_number"], "max_completion_length": 4},
        )
    )
    assert 0.0 <= result.metrics["mean_reward"] <= 1.0


@pytest.mark.slow
def test_dpo_starts_from_a_lora_result_logged_to_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    lora = assignment(tmp_path, "lora", save_model=True)
    run(lora)
    adapter = Path(lora.output_dir) / "model"
    assert (adapter / "adapter_config.json").exists()  # a LoRA result is an adapter
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as parent:
        mlflow.log_artifacts(str(adapter), artifact_path="model")
    dpo = assignment(
        tmp_path,
        "dpo",
        model={"name_or_path": f"runs:/{parent.info.run_id}/model"},
        save_model=True,
    )
    run(dpo)
    # trl kept the adapter trainable and froze a copy of it as the reference model.
    assert (Path(dpo.output_dir) / "model" / "adapter_config.json").exists()
    rank0 = json.loads((Path(dpo.output_dir) / "rank-0.json").read_text())
    assert rank0["reference"] == "frozen copy of the starting adapter"


@pytest.mark.slow
def test_dpo_with_lora_r_trains_a_new_adapter_whose_base_is_the_reference(
    tmp_path: Path,
) -> None:
    dpo = assignment(tmp_path, "dpo", params={"lora_r": 4}, save_model=True)
    run(dpo)
    saved = Path(dpo.output_dir) / "model"
    assert (saved / "adapter_config.json").exists()  # the adapter, not a full model
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 4
    rank0 = json.loads((Path(dpo.output_dir) / "rank-0.json").read_text())
    assert rank0["reference"] == "the policy with its adapter disabled"


def test_dpo_refuses_a_new_adapter_on_top_of_an_adapter_naming_lora_r(tmp_path: Path) -> None:
    from peft import get_peft_model

    from stagetune.contract.training import DPOTraining
    from stagetune.trainer.stages.common import load_model
    from stagetune.trainer.stages.dpo import new_adapter
    from stagetune.trainer.stages.lora import lora_config
    from stagetune.trainer.tiny_model import ensure_model

    model, _ = load_model(ensure_model({"tiny": TINY}, tmp_path))
    settings = DPOTraining(lora_r=4)
    assert new_adapter(DPOTraining(), model, None) is None  # lora_r 0: the whole model
    assert new_adapter(settings, model, None).r == 4
    adapter = get_peft_model(model, lora_config(settings))
    with pytest.raises(ValueError, match="^lora_r: runner.model is already a LoRA adapter"):
        new_adapter(settings, adapter, None)
    with pytest.raises(ValueError, match="^lora_r: a new adapter's reference is its own base"):
        new_adapter(settings, model, model)


@pytest.mark.parametrize("kind", ["parquet", "datasets-folder", "jsonl.gz"])
def test_parquet_a_saved_dataset_and_gzipped_jsonl_load_with_a_column_mapping(
    kind: str, tmp_path: Path
) -> None:
    import datasets

    from stagetune.contract.datafiles import check_data_files, columns_of
    from stagetune.trainer.tasks import load_sft_dataset

    rows = [{"q": f"What is {i} plus 1?", "a": str(i + 1), "noise": i} for i in range(100)]
    table = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        path = tmp_path / "pairs.parquet"
        table.to_parquet(str(path))
    elif kind == "datasets-folder":
        path = tmp_path / "saved"
        table.save_to_disk(str(path))
    else:
        path = tmp_path / "pairs.jsonl.gz"
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    assert columns_of(path) == {"q", "a", "noise"}
    cfg = {
        "path": str(path),
        "prompt_columns": ["q"],
        "completion_column": "a",
        "train_size": 16,
        "eval_size": 4,
    }
    data = config("sft")
    data["runner"]["data"] = cfg
    spec = spec_from_mapping(data)
    validate_spec(spec)
    check_data_files(spec)  # what `stagetune submit` runs: it reads the file's columns too
    train, evals = load_sft_dataset(parse_runner("sft", spec.runner).data)
    assert (len(train), len(evals)) == (16, 4)
    assert train[0]["prompt"].startswith("What is") and train[0]["completion"].startswith(" ")
