"""The stage registry: every lifecycle stage, once, with all that is known about it.

Each ``StageDef`` gives a stage's wire name (``STAGE_NAMES``), its training settings class
(its knobs, their defaults and help: ``stagetune.contract.training``), the runner a trial
process calls, its default search space and objectives, and the data columns it reads.
The spec parser and validator, the wire conversion, the server and the trainer all read
stages from here; nothing else lists them. Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stagetune.contract.names import EnumNames
from stagetune.contract.training import (
    REWARD_FUNCTIONS,
    CustomTraining,
    DPOTraining,
    GRPOTraining,
    LoRATraining,
    ParamDef,
    ParamKind,
    PretrainProxyTraining,
    SFTTraining,
    TrainingSettings,
    knobs,
)
from stagetune.v1 import types_pb2 as pb

__all__ = [
    "ParamKind",
    "ParamDef",
    "StageDef",
    "STAGES",
    "CUSTOM",
    "find_stage",
    "STAGE_NAMES",
    "RUNNER_KEYS",
    "REWARD_FUNCTIONS",
]

#: Top-level keys allowed in a study's ``runner`` section.
RUNNER_KEYS = frozenset(
    {
        "model",
        "data",
        "training",
        "cache_dir",
        "processes",
        "save_model",
        "evaluate",
        "reference_model",
    }
)


@dataclass(frozen=True)
class StageDef:
    """One stage: its settings (knobs, defaults, help), runner, default study and data."""

    name: str
    summary: str
    #: The stage's ``runner.training``, typed; its fields are the stage's knobs.
    settings: type[TrainingSettings]
    #: ``module:function`` of the runner a trial process calls, imported there only (it
    #: pulls in torch); a string, so the contract imports nothing of the trainer.
    runner: str
    default_objectives: tuple[str, ...] = ("eval_loss", "decode_latency_ms", "peak_memory_mb")
    default_search_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``runner.data`` keys that map file columns for this stage
    data_columns: tuple[str, ...] = ()
    #: this stage's defaults of ``runner.data`` fields, where they differ from DataSource's
    data_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, ParamDef]:
        """The knobs a search space may name."""
        return {k: d for k, d in knobs(self.settings).items() if d.searchable}

    @property
    def fixed_only(self) -> dict[str, ParamDef]:
        """The knobs only ``runner.training`` may set."""
        return {k: d for k, d in knobs(self.settings).items() if not d.searchable}

    @property
    def training_keys(self) -> frozenset[str]:
        """Keys allowed under ``runner.training`` (fixed values of any knob)."""
        return frozenset(knobs(self.settings))

    def knob(self, name: str) -> ParamDef | None:
        return knobs(self.settings).get(name)


_SFT_COLUMNS = ("prompt_columns", "completion_column")

STAGES: dict[str, StageDef] = {
    "pretrain_proxy": StageDef(
        name="pretrain_proxy",
        summary="causal LM trained from scratch (random init) as a proxy for pretraining",
        settings=PretrainProxyTraining,
        runner="stagetune.trainer.stages.pretrain:run_pretrain_proxy",
        default_objectives=("eval_loss", "decode_latency_ms", "peak_memory_mb"),
        default_search_space={
            "learning_rate": {"type": "float", "low": 3e-4, "high": 3e-2, "log": True},
            "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
            "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
            "per_device_train_batch_size": {"type": "categorical", "choices": [4, 8, 16]},
            "hidden_size": {"type": "categorical", "choices": [32, 48, 64]},
            "num_layers": {"type": "int", "low": 1, "high": 2},
        },
        data_columns=("text_column",),
    ),
    "sft": StageDef(
        name="sft",
        summary="full fine-tune with trl's SFTTrainer",
        settings=SFTTraining,
        runner="stagetune.trainer.stages.sft:run_sft",
        default_search_space={
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "lr_scheduler_type": {"type": "categorical", "choices": ["linear", "cosine"]},
            "per_device_train_batch_size": {"type": "categorical", "choices": [4, 8, 16]},
        },
        data_columns=_SFT_COLUMNS,
    ),
    "lora": StageDef(
        name="lora",
        summary="LoRA adapter trained with trl's SFTTrainer and peft",
        settings=LoRATraining,
        runner="stagetune.trainer.stages.lora:run_lora",
        default_search_space={
            "learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
            "lora_r": {"type": "int", "low": 2, "high": 32, "log": True},
            "lora_alpha": {"type": "categorical", "choices": [8, 16, 32, 64]},
            "lora_dropout": {"type": "float", "low": 0.0, "high": 0.2},
        },
        data_columns=_SFT_COLUMNS,
    ),
    "dpo": StageDef(
        name="dpo",
        summary="preference tuning with trl's DPOTrainer, from a base or SFT/LoRA result",
        settings=DPOTraining,
        runner="stagetune.trainer.stages.dpo:run_dpo",
        default_objectives=("reward_accuracy", "peak_memory_mb", "device_seconds"),
        default_search_space={
            "beta": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
            "loss_type": {"type": "categorical", "choices": ["sigmoid", "ipo", "hinge"]},
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        },
        data_columns=("prompt_columns", "chosen_column", "rejected_column"),
        # No prompt columns: the prompt is the shared start of the chosen and rejected
        # texts (the hh-rlhf layout).
        data_defaults={"prompt_columns": ()},
    ),
    "grpo": StageDef(
        name="grpo",
        summary="online RL with trl's GRPOTrainer and reward functions from the config",
        settings=GRPOTraining,
        runner="stagetune.trainer.stages.grpo:run_grpo",
        default_objectives=("mean_reward", "peak_memory_mb", "device_seconds"),
        default_search_space={
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "beta": {"type": "float", "low": 0.0, "high": 0.2},
            "num_generations": {"type": "categorical", "choices": [2, 4]},
            "temperature": {"type": "float", "low": 0.5, "high": 1.2},
        },
        data_columns=_SFT_COLUMNS,
    ),
}

#: A team's own training script. A study names it (``runner.script: finetune``); a worker
#: runs it only when its operator allowed a script of that name (``stagetune worker
#: --allow-script finetune=PATH``), so a spec never carries a command. Not among ``STAGES``
#: (the built-in runners): it has no packaged config, defaults or data columns; a study
#: names its own search space (the common knobs, or names of the script's own) and the
#: metrics its script reports (``stagetune.contract.spec.custom``).
CUSTOM = StageDef(
    name="custom",
    summary="a team's own training script, one the worker's operator allows (runner.script)",
    settings=CustomTraining,
    # The trial process the worker starts with the allowed script's path.
    runner="stagetune.trainer.custom_trial:main",
    default_objectives=(),
)


def find_stage(name: str) -> StageDef | None:
    """The stage called ``name``: a built-in one or ``custom``; None when there is none."""
    return CUSTOM if name == CUSTOM.name else STAGES.get(name)


#: Stage names <-> ``stagetune.v1.Stage`` values (``"sft"`` <-> ``STAGE_SFT``).
STAGE_NAMES: EnumNames[str, pb.Stage] = EnumNames(pb.Stage, "STAGE_", (*STAGES, CUSTOM.name))
