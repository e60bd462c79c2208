"""The LoRA stage: supervised fine-tuning of a peft LoRA adapter with trl's SFTTrainer."""

from __future__ import annotations

from typing import Any

from stagetune.trainer.assignment import Assignment, TrialResult
from stagetune.trainer.rungs import Reporter
from stagetune.trainer.stages.sft import run_sft_like

__all__ = ["run_lora", "DEFAULTS"]

DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": "all-linear",
}


def lora_config(cfg: dict[str, Any]) -> Any:
    from peft import LoraConfig

    targets = str(cfg["lora_target_modules"])
    return LoraConfig(
        r=int(cfg["lora_r"]),
        lora_alpha=int(cfg["lora_alpha"]),
        lora_dropout=float(cfg["lora_dropout"]),
        target_modules=targets if targets == "all-linear" else targets.split(","),
        task_type="CAUSAL_LM",
    )


def run_lora(a: Assignment, reporter: Reporter) -> TrialResult:
    return run_sft_like(a, reporter, DEFAULTS, peft_config=lora_config)
