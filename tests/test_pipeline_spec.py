"""Pipeline files: stages from packaged configs, files or inline mappings with overrides,
selection rules, retrains, the previous stage's model; every error names the field as the
file spells it; the wire form round-trips; the studies a stage derives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.pipeline import (
    Selection,
    evaluation_study,
    final_study,
    search_study,
)
from stagetune.contract.pipeline_file import (
    load_pipeline_file,
    packaged_pipelines,
    pipeline_from_mapping,
)
from stagetune.contract.pipeline_wire import pipeline_from_proto, pipeline_to_proto
from stagetune.contract.spec import CategoricalParam, ConstraintSpec, validate_spec
from tests.conftest import REPO

TINY = {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}}


def pipeline(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "life",
        "stages": [
            {"name": "pre", "study": "pretrain_proxy", "final": {"steps": 16}},
            {
                "name": "sft",
                "study": "sft",
                "overrides": {"runner": {"model": {"from": "previous"}}},
                "select": {"best": "eval_loss", "limits": ["decode_latency_ms <= 8"]},
            },
        ],
    }
    data.update(changes)
    return data


def error_field(data: dict[str, Any], base: Path | None = None) -> str:
    with pytest.raises(InvalidArgument) as e:
        pipeline_from_mapping(data, base)
    return e.value.field


def test_the_packaged_pipelines_load_and_validate() -> None:
    assert "tiny-lifecycle" in packaged_pipelines()
    for name in packaged_pipelines():
        spec = load_pipeline_file(name)
        assert spec.stages
        assert load_pipeline_file(REPO / "configs" / "pipelines" / f"{name}.yaml") == spec


def test_stages_are_named_after_the_pipeline_and_later_ones_start_from_the_previous() -> None:
    spec = pipeline_from_mapping(pipeline())
    pre, sft = spec.stages
    assert (pre.study.name, sft.study.name) == ("life.pre", "life.sft")
    assert spec.study_names(0) == ("life.pre", "life.pre.final", "life.pre.test")
    assert not pre.model_from_previous and "model" in pre.study.runner
    assert sft.model_from_previous and "model" not in sft.study.runner
    assert pre.final_steps == 16 and sft.final_steps == 0
    assert pre.select == Selection()  # knee by default
    assert sft.select == Selection("best", "eval_loss", (ConstraintSpec("decode_latency_ms", 8),))


def test_overrides_merge_into_the_referenced_config() -> None:
    data = pipeline()
    data["stages"][0]["overrides"] = {"budget": {"max_trials": 3}, "runner": {"model": TINY}}
    pre = pipeline_from_mapping(data).stages[0].study
    assert pre.budget.max_trials == 3
    assert pre.budget.max_retries == 1  # kept from configs/pretrain_proxy.yaml
    assert pre.runner["model"]["tiny"]["hidden_size"] == 32
    assert pre.runner["data"]["synthetic"] == "arithmetic"  # kept


def test_a_study_file_next_to_the_pipeline_file_and_an_inline_study(tmp_path: Path) -> None:
    study = yaml.safe_load((REPO / "configs" / "sft.yaml").read_text())
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**study, "name": "ignored"}))
    inline = yaml.safe_load((REPO / "configs" / "dpo.yaml").read_text())
    del inline["runner"]["model"]
    inline["runner"]["model"] = {"from": "previous"}
    data = {
        "name": "files",
        "stages": [
            {"name": "sft", "study": "mine.yaml", "select": "manual"},
            {"name": "dpo", "study": inline},
        ],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    spec = load_pipeline_file(tmp_path / "p.yaml")
    assert [s.study.stage for s in spec.stages] == ["sft", "dpo"]
    assert spec.stages[0].study.name == "files.sft"
    assert spec.stages[0].select.rule == "manual"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(name="no spaces"), "name"),
        (lambda d: d.update(stages=[]), "stages"),
        (lambda d: d.update(budget={"max_device_hours": 0}), "budget.max_device_hours"),
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["stages"][1].update(name="pre"), "stages[1].name"),
        (lambda d: d["stages"][0].update(study="nope"), "stages[0].study"),
        (lambda d: d["stages"][0].update(select="best"), "stages[0].select"),
        (lambda d: d["stages"][1].update(select={"best": "beauty"}), "stages[1].select.best"),
        (
            lambda d: d["stages"][1].update(select={"best": "eval_loss", "limits": ["x <= 1"]}),
            "stages[1].select.limits[0]",
        ),
        (lambda d: d["stages"][0].update(final={"steps": 0}), "stages[0].final.steps"),
        (lambda d: d["stages"][0].update(final={}), "stages[0].final.steps"),
        (
            lambda d: d["stages"][0].update(overrides={"budget": {"max_trials": 0}}),
            "stages[0].study.budget.max_trials",
        ),
        (
            lambda d: d["stages"][0].update(overrides={"runner": {"model": {"from": "previous"}}}),
            "stages[0].study.runner.model.from",
        ),
        (lambda d: d["stages"][1].update(overrides={}), "stages[1].study.runner.model"),
        (
            lambda d: d["stages"][1].update(overrides={"runner": {"model": {"from": "a/path"}}}),
            "stages[1].study.runner.model.from",
        ),
        (
            # The test evaluation needs test rows: checked when the pipeline is submitted.
            lambda d: d["stages"][0].update(
                overrides={
                    "runner": {
                        "data": {"split": {"fractions": {"train": 0.9, "eval": 0.1, "test": 0}}}
                    }
                }
            ),
            "stages[0].study.runner.data.split.fractions.test",
        ),
    ],
)
def test_errors_name_the_field(change: Any, field: str) -> None:
    data = pipeline()
    change(data)
    assert error_field(data) == field


def test_the_wire_form_round_trips() -> None:
    spec = pipeline_from_mapping(pipeline(budget={"max_device_hours": 1.5}))
    assert pipeline_from_proto(pipeline_to_proto(spec)) == spec
    assert pipeline_to_proto(spec).max_device_hours == 1.5


def test_the_derived_studies() -> None:
    spec = pipeline_from_mapping(pipeline(budget={"max_device_hours": 2}))
    base = {"name_or_path": "models:/life.pre/3"}
    search = search_study(spec, 1, base, 0.5)
    assert search.name == "life.sft" and search.runner["model"] == base
    assert search.runner["save_model"]  # no retrain: the selected trial's own model is promoted
    assert search.budget.max_device_hours == 0.5
    params = {"learning_rate": 0.01, "per_device_train_batch_size": 8}
    final = final_study(spec, 0, {"tiny": {}}, {"learning_rate": 0.003}, None)
    assert final.name == "life.pre.final"
    assert final.search_space == (CategoricalParam("learning_rate", (0.003,)),)
    assert (final.fidelity.min_steps, final.fidelity.max_steps) == (16, 16)
    assert final.budget.max_trials == 1 and final.early_stopping == "none"
    assert final.runner["save_model"]
    test = evaluation_study(spec, 1, "models:/life.sft/1", base, params, 0.25)
    assert test.name == "life.sft.test"
    assert test.runner["evaluate"] == "test"
    assert test.runner["model"] == {"name_or_path": "models:/life.sft/1"}
    assert test.constraints == () and test.budget.max_device_hours == 0.25
    for s in (search, final, test):
        validate_spec(s)


def test_a_dpo_evaluation_measures_against_what_the_stage_started_from() -> None:
    spec = load_pipeline_file("tiny-lifecycle")
    i = [s.name for s in spec.stages].index("dpo")
    base = {"name_or_path": "models:/tiny-lifecycle.sft/2"}
    test = evaluation_study(spec, i, "models:/tiny-lifecycle.dpo/1", base, {"beta": 0.1}, None)
    assert test.runner["reference_model"] == base
    validate_spec(test)
