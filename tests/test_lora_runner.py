"""The trial process's parts: tiny model, data, the LoRA runner with rung reporting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec import DataSource
from stagetune.trainer.assignment import Assignment
from stagetune.trainer.rungs import NullReporter
from stagetune.trainer.tasks import answer_of, load_sft_dataset, synthetic_sft
from stagetune.trainer.tiny_model import build_tiny_model, ensure_model
from tests.conftest import SHARED_DATA
from tests.test_stages import TINY, assignment, run_launched


def test_tiny_model_is_built_once_and_loads_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_model({"tiny": TINY}, tmp_path)
    assert ensure_model({"tiny": TINY}, tmp_path) == path
    assert build_tiny_model(Path(path)).stat().st_mtime == Path(path).stat().st_mtime
    tok = AutoTokenizer.from_pretrained(path)
    text = "What is 12 plus 7? 19"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.hidden_size == 32


def test_model_config_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="runner.model"):
        ensure_model({})


def test_synthetic_task_is_deterministic_with_checkable_answers() -> None:
    rows = synthetic_sft(20, seed=3)
    assert rows == synthetic_sft(20, seed=3)
    for row in rows:
        a, b = (int(x) for x in row["prompt"].removeprefix("What is ").rstrip("?").split(" plus "))
        assert answer_of(row["completion"]) == str(a + b)


def test_local_jsonl_with_a_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join(json.dumps({"q": f"q{i}", "ctx": "", "a": f"a{i}"}) for i in range(60))
    )
    cfg = DataSource(
        path=str(path),
        prompt_columns=("q", "ctx"),
        completion_column="a",
        train_size=15,
        eval_size=3,
    )
    train, evals = load_sft_dataset(cfg)
    assert (len(train), len(evals)) == (15, 3)
    row = train[0]
    assert row["prompt"].startswith("q") and row["completion"].startswith(" a")


def test_a_missing_column_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"q": "x", "a": "y"}))
    with pytest.raises(InvalidArgument, match=r"runner.data.completion_column: column 'answer'"):
        load_sft_dataset(
            DataSource(path=str(path), prompt_columns=("q",), completion_column="answer")
        )


def test_gsm8k_loads_with_the_alpaca_mapping() -> None:
    path = SHARED_DATA / "gsm8k-train-alpaca.json"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    cfg = DataSource(
        path=str(path),
        prompt_columns=("instruction", "input"),
        completion_column="output",
        train_size=40,
        eval_size=8,
    )
    train, evals = load_sft_dataset(cfg)
    assert len(train) == 40 and len(evals) == 8
    assert answer_of(train[0]["completion"]) is not None


def _assignment(tmp_path: Path) -> Assignment:
    return assignment(tmp_path, "lora", params={"learning_rate": 5e-3, "lora_r": 4})


def test_run_lora_reports_each_rung_and_measures_every_objective(tmp_path: Path) -> None:
    from stagetune.trainer.stages.lora import run_lora

    reporter = NullReporter()
    result = run_lora(_assignment(tmp_path), reporter)
    assert result.status == "complete"
    assert [step for step, _ in reporter.calls] == [2, 4]
    m = result.metrics
    assert m["eval_loss"] == reporter.calls[-1][1]["eval_loss"]
    for key in ("decode_latency_ms", "ttft_ms", "peak_memory_mb", "device_seconds"):
        assert m[key] > 0, key
    assert 0.0 <= m["exact_match"] <= 1.0


def test_a_diverged_run_reports_a_perplexity_the_server_accepts() -> None:
    from types import SimpleNamespace

    from stagetune.contract.spec import MAX_MAGNITUDE
    from stagetune.trainer.rungs import RungCallback

    reporter = NullReporter()
    callback = RungCallback([2], reporter)
    state = SimpleNamespace(global_step=2, is_world_process_zero=True)
    control = SimpleNamespace(should_training_stop=False)
    callback.on_evaluate(None, state, control, metrics={"eval_loss": 120.0})
    ((step, sent),) = reporter.calls
    assert step == 2 and sent["eval_loss"] == 120.0
    assert sent["perplexity"] == MAX_MAGNITUDE  # exp(120) would be refused as out of range


class _StopAtFirstRung(NullReporter):
    def report(self, step: int, metrics: dict[str, float]) -> tuple[bool, str]:
        super().report(step, metrics)
        return True, "dominated at rung 2"


def test_a_stop_decision_ends_training_at_that_rung(tmp_path: Path) -> None:
    from stagetune.trainer.stages.lora import run_lora

    reporter = _StopAtFirstRung()
    result = run_lora(_assignment(tmp_path), reporter)
    assert result.status == "stopped" and result.reason == "dominated at rung 2"
    assert [r["step"] for r in result.rungs] == [2]
    assert len(reporter.calls) == 1


@pytest.mark.slow
def test_two_cpu_ranks_train_one_trial_and_count_two_devices(tmp_path: Path) -> None:
    a = _assignment(tmp_path)
    result = run_launched(a, processes=2, timeout=300)
    assert result.status == "complete"
    assert [r["step"] for r in result.rungs] == [2, 4]
    # Both processes count: device-seconds are twice the trial's wall seconds.
    m = result.metrics
    assert m["device_seconds"] == pytest.approx(2 * m["wall_seconds"], rel=1e-6)
    # Both ranks trained, with the same settings from the one assignment file, and ended
    # with the same weights (DDP kept them in step).
    ranks = [json.loads((Path(a.output_dir) / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["steps"] for r in ranks] == [4, 4]
    assert ranks[0]["settings"] == ranks[1]["settings"]
    assert ranks[0]["settings"]["learning_rate"] == a.params["learning_rate"]
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-6)


def test_the_served_form_merges_the_adapter_and_computes_what_it_computed(
    tmp_path: Path,
) -> None:
    """Final quality and decode latency are measured on the model as served (and as the
    next stage loads it): the adapter merged into its base, its outputs unchanged."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from stagetune.trainer.stages.common import served

    path = ensure_model({"tiny": TINY}, tmp_path)
    base = AutoModelForCausalLM.from_pretrained(path)
    # A non-zero adapter (peft's default initialises B to zero: a no-op adapter).
    adapter = get_peft_model(
        base,
        LoraConfig(
            r=4, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False
        ),
    )
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        before = adapter(input_ids=ids).logits
        with adapter.disable_adapter():
            without = adapter(input_ids=ids).logits
        merged = served(adapter)
        after = merged(input_ids=ids).logits
    assert not torch.allclose(before, without)  # the adapter matters
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    assert not hasattr(merged, "peft_config")
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert served(merged) is merged  # a plain model is served as it is
