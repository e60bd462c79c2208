"""The LoRA stage: supervised fine-tuning of a peft LoRA adapter with trl's SFTTrainer."""

from __future__ import annotations

from typing import Any

from stagetune.contract.training import DPOTraining, LoRATraining
from stagetune.trainer.assignment import Assignment, TrialResult
from stagetune.trainer.rungs import Reporter
from stagetune.trainer.stages.sft import run_sft_like

__all__ = ["run_lora", "lora_config"]


def lora_config(settings: LoRATraining | DPOTraining) -> Any:
    """peft's LoraConfig for a stage's adapter settings (its ``lora_r`` and shape)."""
    from peft import LoraConfig

    targets = settings.lora_target_modules
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets if targets == "all-linear" else targets.split(","),
        task_type="CAUSAL_LM",
    )


def run_lora(a: Assignment, reporter: Reporter) -> TrialResult:
    return run_sft_like(a, reporter, LoRATraining, peft_config=lora_config)
