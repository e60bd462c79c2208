"""The runner section, typed: one settings class per stage with defaults and help, parsed
at the edge with errors that name the field, and the same settings a trial trains with."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec import (
    DataSource,
    load_spec_file,
    parse_runner,
    spec_from_proto,
    spec_to_proto,
)
from stagetune.contract.stages import STAGES
from stagetune.contract.training import (
    DPOTraining,
    GRPOTraining,
    LoRATraining,
    PretrainProxyTraining,
    SFTTraining,
    knobs,
)
from tests.conftest import REPO

SETTINGS = {
    "pretrain_proxy": PretrainProxyTraining,
    "sft": SFTTraining,
    "lora": LoRATraining,
    "dpo": DPOTraining,
    "grpo": GRPOTraining,
}


def config(stage: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "configs" / f"{stage}.yaml").read_text())
    return data


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_packaged_config_parses_to_its_stages_settings_class(stage: str) -> None:
    spec = load_spec_file(REPO / "configs" / f"{stage}.yaml")
    runner = parse_runner(stage, spec.runner)
    assert type(runner.training) is SETTINGS[stage]
    for key, value in spec.runner.get("training", {}).items():
        got = getattr(runner.training, key)
        assert got == (tuple(value) if isinstance(value, list) else value), key
    untouched = set(knobs(SETTINGS[stage])) - set(spec.runner.get("training", {}))
    default = SETTINGS[stage]()
    assert all(getattr(runner.training, k) == getattr(default, k) for k in untouched)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_knob_has_help_and_the_searchable_ones_are_the_stages_params(stage: str) -> None:
    fields = dataclasses.fields(SETTINGS[stage])
    assert all(f.metadata["help"] for f in fields)
    assert STAGES[stage].params.keys() == {f.name for f in fields if f.metadata["searchable"]}


def test_stage_defaults_live_in_the_settings_classes() -> None:
    assert PretrainProxyTraining().learning_rate == 3e-3
    assert SFTTraining().learning_rate == 1e-3
    assert (DPOTraining().beta, GRPOTraining().beta) == (0.1, 0.04)
    assert GRPOTraining().reward_functions == ("exact_match", "has_number")
    assert LoRATraining().lora_target_modules == "all-linear"


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda r: r["training"].update(zero_stage=4), "runner.training.zero_stage"),
        (lambda r: r["training"].update(learning_rate="fast"), "runner.training.learning_rate"),
        (lambda r: r["training"].update(max_length=float("inf")), "runner.training.max_length"),
        (lambda r: r["training"].update(beta=0.1), "runner.training.beta"),  # not a lora knob
        (lambda r: r["model"].update(tiny={"layers": 2}), "runner.model.tiny.layers"),
        (lambda r: r.update(model={"name_or_path": ""}), "runner.model.name_or_path"),
        (lambda r: r["data"].update(prompt_columns="q"), "runner.data.prompt_columns"),
        (lambda r: r["data"].update(train_size=0), "runner.data.train_size"),
        (lambda r: r["data"].update(path="x.jsonl"), "runner.data"),
        (lambda r: r.update(processes=0), "runner.processes"),
        (lambda r: r.update(cache_dir=7), "runner.cache_dir"),
        (lambda r: r.update(workers=2), "runner.workers"),
    ],
)
def test_a_bad_runner_value_is_refused_naming_its_field(edit: Any, field: str) -> None:
    runner = config("lora")["runner"]
    edit(runner)
    with pytest.raises(InvalidArgument) as err:
        parse_runner("lora", runner)
    assert err.value.field == field


def test_a_trials_params_override_the_fixed_values_and_take_the_fields_type() -> None:
    runner = config("lora")["runner"]
    runner["training"]["learning_rate"] = 0.1
    parsed = parse_runner("lora", runner, {"learning_rate": 1, "lora_r": 4})
    assert isinstance(parsed.training, LoRATraining)
    assert parsed.training.learning_rate == 1.0 and type(parsed.training.learning_rate) is float
    assert parsed.training.lora_r == 4
    with pytest.raises(InvalidArgument) as err:
        parse_runner("lora", runner, {"lora_r": 0})
    assert err.value.field == "params.lora_r"


def test_reward_functions_as_a_list_or_one_string_are_the_same_settings() -> None:
    runner = config("grpo")["runner"]
    runner["training"]["reward_functions"] = ["exact_match", "has_number"]
    as_list = parse_runner("grpo", runner).training
    runner["training"]["reward_functions"] = "exact_match,has_number"
    assert parse_runner("grpo", runner).training == as_list
    runner["training"]["reward_functions"] = ["vibes"]
    with pytest.raises(InvalidArgument, match="vibes") as err:
        parse_runner("grpo", runner)
    assert err.value.field == "runner.training.reward_functions"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_runner_section_crosses_the_wire_unchanged_and_parses_the_same(stage: str) -> None:
    # The runner travels (and is stored) as a Struct, where every number is a double.
    spec = load_spec_file(REPO / "configs" / f"{stage}.yaml")
    back = spec_from_proto(spec_to_proto(spec))
    assert back.runner == spec.runner
    assert parse_runner(stage, back.runner) == parse_runner(stage, spec.runner)


def test_dpo_reads_no_prompt_column_unless_the_config_names_one(tmp_path: Path) -> None:
    runner = config("dpo")["runner"]
    runner["data"] = {"path": str(tmp_path / "pairs.jsonl")}
    data = parse_runner("dpo", runner).data
    assert data.prompt_columns == ()
    assert data.columns(STAGES["dpo"].data_columns) == {
        "chosen_column": ("chosen",),
        "rejected_column": ("rejected",),
    }
    sft = parse_runner("sft", {**config("sft")["runner"], "data": runner["data"]}).data
    assert sft.columns(STAGES["sft"].data_columns)["prompt_columns"] == ("prompt",)
    assert DataSource().path is None and DataSource().synthetic == "arithmetic"
