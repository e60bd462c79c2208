"""The stage catalog: what each lifecycle stage can search over and which objectives it has.

Shared by the CLI and the server (to refuse a bad study at submit time, naming the field)
and by the trainer (to know what a param means). Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ParamKind = Literal["float", "int", "str", "bool"]

__all__ = ["ParamKind", "StageDef", "STAGES", "RUNNER_KEYS"]

#: Top-level keys allowed in a study's ``runner`` section.
RUNNER_KEYS = frozenset({"model", "data", "training", "cache_dir", "processes"})


@dataclass(frozen=True)
class StageDef:
    """One stage: searchable params (name → value kind), fixed-only training keys, defaults."""

    name: str
    params: dict[str, ParamKind]
    fixed_only: frozenset[str] = frozenset()
    default_objectives: tuple[str, ...] = ("eval_loss", "decode_latency_ms", "peak_memory_mb")
    default_search_space: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def training_keys(self) -> frozenset[str]:
        """Keys allowed under ``runner.training`` (fixed values of any param, and more)."""
        return frozenset(self.params) | self.fixed_only


_OPTIMISATION: dict[str, ParamKind] = {
    "learning_rate": "float",
    "warmup_ratio": "float",
    "weight_decay": "float",
    "lr_scheduler_type": "str",
    "per_device_train_batch_size": "int",
    "gradient_accumulation_steps": "int",
}

_LORA: dict[str, ParamKind] = {
    "lora_r": "int",
    "lora_alpha": "int",
    "lora_dropout": "float",
    "lora_target_modules": "str",
}

STAGES: dict[str, StageDef] = {
    "lora": StageDef(
        name="lora",
        params={**_OPTIMISATION, **_LORA},
        fixed_only=frozenset({"max_length", "per_device_eval_batch_size"}),
        default_search_space={
            "learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
            "lora_r": {"type": "int", "low": 2, "high": 32, "log": True},
            "lora_alpha": {"type": "categorical", "choices": [8, 16, 32, 64]},
            "lora_dropout": {"type": "float", "low": 0.0, "high": 0.2},
        },
    ),
}
