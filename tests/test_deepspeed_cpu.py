"""DeepSpeed ZeRO on CPU (it runs there over gloo): real trials launched the way the
worker launches them, on 1 and 2 processes. The GPU figures come from bench runs on a
lent GPU machine, not from this suite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stagetune.trainer.trial_launch import launch_command, uses_deepspeed
from tests.test_stages import assignment, run_launched


def test_a_deepspeed_trial_is_not_launched_with_accelerates_cpu_flag(tmp_path: Path) -> None:
    # accelerate's --cpu switches DeepSpeed off without a word; plain trials keep it.
    plain = assignment(tmp_path, "sft")
    zero2 = assignment(tmp_path, "sft", params={"zero_stage": 2})
    own = assignment(tmp_path, "sft", training={"deepspeed_config": "ds.json"})
    assert (uses_deepspeed(plain), uses_deepspeed(zero2), uses_deepspeed(own)) == (
        False,
        True,
        True,
    )
    assert "--cpu" in launch_command(tmp_path / "a.json", 1, cpu=True, deepspeed=False)
    assert "--cpu" not in launch_command(tmp_path / "a.json", 1, cpu=True, deepspeed=True)


def launch(tmp_path: Path, stage: str, processes: int, zero: int) -> tuple[Any, list[Any]]:
    a = assignment(tmp_path, stage, params={"zero_stage": zero}, save_model=True)
    result = run_launched(a, processes=processes, timeout=400)
    assert result.status == "complete", result.reason
    ranks = [
        json.loads((Path(a.output_dir) / f"rank-{r}.json").read_text()) for r in range(processes)
    ]
    assert all(r["deepspeed_zero_stage"] == zero for r in ranks)  # DeepSpeed really ran
    assert all(r["world_size"] == processes for r in ranks)
    assert all(r["settings"] == ranks[0]["settings"] for r in ranks)
    assert (Path(a.output_dir) / "model" / "config.json").exists()
    return result, ranks


@pytest.mark.slow
def test_dpo_trains_under_zero2_on_two_cpu_processes(tmp_path: Path) -> None:
    result, ranks = launch(tmp_path, "dpo", processes=2, zero=2)
    assert 0.0 <= result.metrics["reward_accuracy"] <= 1.0
    assert result.metrics["device_seconds"] == pytest.approx(
        2 * result.metrics["wall_seconds"], rel=1e-6
    )
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-6)
    assert ranks[0]["reference"] == "separate reference model"


@pytest.mark.slow
def test_zero3_shards_are_gathered_so_rank0_can_decode_and_save(tmp_path: Path) -> None:
    # Under ZeRO-3 no rank holds the whole model; decoding on rank 0 alone used to hang.
    result, _ = launch(tmp_path, "sft", processes=2, zero=3)
    assert result.metrics["decode_latency_ms"] > 0
    assert 0 < result.metrics["eval_loss"] < 10
