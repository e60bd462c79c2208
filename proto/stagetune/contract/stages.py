"""The stage catalog: what each lifecycle stage can search over and which objectives it has.

Shared by the CLI and the server (to refuse a bad study at submit time, naming the field)
and by the trainer (to know what a param means). Imports nothing heavy.

Every stage has the same optimisation and systems knobs (learning rate and schedule,
micro-batch size, gradient accumulation, DeepSpeed ZeRO stage, gradient checkpointing,
mixed precision) plus its own: the proxy's width and depth, LoRA's rank and alpha, DPO's
beta and loss, GRPO's KL weight, group size and temperature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from stagetune.contract.names import EnumNames
from stagetune.v1 import types_pb2 as pb

ParamKind = Literal["float", "int", "str", "bool"]
Value = float | int | str | bool

__all__ = [
    "ParamKind",
    "ParamDef",
    "StageDef",
    "STAGES",
    "STAGE_NAMES",
    "RUNNER_KEYS",
    "REWARD_FUNCTIONS",
]

#: Top-level keys allowed in a study's ``runner`` section.
RUNNER_KEYS = frozenset({"model", "data", "training", "cache_dir", "processes", "save_model"})

#: Reward functions a GRPO study may name in ``runner.training.reward_functions``.
REWARD_FUNCTIONS: dict[str, str] = {
    "exact_match": "1.0 when the last number in the completion equals the row's answer, else 0",
    "has_number": "1.0 when the completion contains a number at all (a format reward), else 0",
}


@dataclass(frozen=True)
class ParamDef:
    """One tunable or fixable knob: its value kind and the values that make sense."""

    kind: ParamKind
    choices: tuple[Value, ...] | None = None  # the only valid values, when listed
    low: float | None = None  # smallest valid value, inclusive
    high: float | None = None  # largest valid value, inclusive
    positive: bool = False  # must be > 0
    help: str = ""

    def check(self, value: Value) -> str | None:
        """Why ``value`` is not valid for this knob, or None when it is."""
        if self.choices is not None and value not in self.choices:
            return f"must be one of {list(self.choices)}, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if self.positive and value <= 0:
            return f"must be > 0, got {value}"
        if self.low is not None and value < self.low:
            return f"must be >= {self.low}, got {value}"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high}, got {value}"
        return None


@dataclass(frozen=True)
class StageDef:
    """One stage: its knobs (searchable or fixed), fixed-only keys, defaults and data."""

    name: str
    summary: str
    #: ``module:function`` of the runner a trial process calls, imported there only (it
    #: pulls in torch); a string, so the contract imports nothing of the trainer.
    runner: str
    params: dict[str, ParamDef]
    fixed_only: dict[str, ParamDef] = field(default_factory=dict)
    default_objectives: tuple[str, ...] = ("eval_loss", "decode_latency_ms", "peak_memory_mb")
    default_search_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: columns ``runner.data`` must map when it reads a file: key -> default column name
    data_columns: dict[str, str] = field(default_factory=dict)

    @property
    def training_keys(self) -> frozenset[str]:
        """Keys allowed under ``runner.training`` (fixed values of any param, and more)."""
        return frozenset(self.params) | frozenset(self.fixed_only)

    def knob(self, name: str) -> ParamDef | None:
        return self.params.get(name) or self.fixed_only.get(name)


_SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)

_OPTIMISATION: dict[str, ParamDef] = {
    "learning_rate": ParamDef("float", positive=True, high=1.0),
    "warmup_ratio": ParamDef("float", low=0.0, high=0.99),
    "weight_decay": ParamDef("float", low=0.0, high=1.0),
    "lr_scheduler_type": ParamDef("str", choices=_SCHEDULES),
}

_SYSTEMS: dict[str, ParamDef] = {
    "per_device_train_batch_size": ParamDef("int", low=1, high=4096, help="micro-batch size"),
    "gradient_accumulation_steps": ParamDef("int", low=1, high=4096),
    "zero_stage": ParamDef(
        "int",
        choices=(0, 1, 2, 3),
        help="DeepSpeed ZeRO stage from configs/deepspeed/zero<N>.json; 0 = no DeepSpeed",
    ),
    "gradient_checkpointing": ParamDef("bool"),
    "mixed_precision": ParamDef("str", choices=("no", "bf16", "fp16"), help="fp16 needs a GPU"),
}

_COMMON_FIXED: dict[str, ParamDef] = {
    "max_length": ParamDef("int", low=8, high=1_048_576, help="tokens per training sequence"),
    "per_device_eval_batch_size": ParamDef("int", low=1, high=4096),
    "deepspeed_config": ParamDef("str", help="a DeepSpeed JSON of your own (overrides zero_stage)"),
}

_LORA: dict[str, ParamDef] = {
    "lora_r": ParamDef("int", low=1, high=1024),
    "lora_alpha": ParamDef("int", low=1, high=4096),
    "lora_dropout": ParamDef("float", low=0.0, high=0.9),
    "lora_target_modules": ParamDef("str", help="'all-linear' or comma-separated module names"),
}

_SFT_COLUMNS = {"prompt_columns": "prompt", "completion_column": "completion"}

_DPO_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)

STAGES: dict[str, StageDef] = {
    "pretrain_proxy": StageDef(
        name="pretrain_proxy",
        summary="causal LM trained from scratch (random init) as a proxy for pretraining",
        runner="stagetune.trainer.stages.pretrain:run_pretrain_proxy",
        params={
            **_OPTIMISATION,
            **_SYSTEMS,
            "hidden_size": ParamDef("int", low=8, high=65536, help="width of the proxy"),
            "num_layers": ParamDef("int", low=1, high=512, help="depth of the proxy"),
        },
        fixed_only={
            **_COMMON_FIXED,
            "head_dim": ParamDef("int", low=4, high=512, help="heads = hidden_size / head_dim"),
            "mlp_ratio": ParamDef("float", positive=True, high=64.0),
        },
        default_objectives=("eval_loss", "decode_latency_ms", "peak_memory_mb"),
        default_search_space={
            "learning_rate": {"type": "float", "low": 3e-4, "high": 3e-2, "log": True},
            "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
            "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
            "per_device_train_batch_size": {"type": "categorical", "choices": [4, 8, 16]},
            "hidden_size": {"type": "categorical", "choices": [32, 48, 64]},
            "num_layers": {"type": "int", "low": 1, "high": 2},
        },
        data_columns={"text_column": "text"},
    ),
    "sft": StageDef(
        name="sft",
        summary="full fine-tune with trl's SFTTrainer",
        runner="stagetune.trainer.stages.sft:run_sft",
        params={**_OPTIMISATION, **_SYSTEMS},
        fixed_only=dict(_COMMON_FIXED),
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
        runner="stagetune.trainer.stages.lora:run_lora",
        params={**_OPTIMISATION, **_SYSTEMS, **_LORA},
        fixed_only=dict(_COMMON_FIXED),
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
        runner="stagetune.trainer.stages.dpo:run_dpo",
        params={
            **_OPTIMISATION,
            **_SYSTEMS,
            "beta": ParamDef("float", positive=True, high=100.0, help="KL strength"),
            "loss_type": ParamDef("str", choices=_DPO_LOSSES),
        },
        fixed_only=dict(_COMMON_FIXED),
        default_objectives=("reward_accuracy", "peak_memory_mb", "device_seconds"),
        default_search_space={
            "beta": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
            "loss_type": {"type": "categorical", "choices": ["sigmoid", "ipo", "hinge"]},
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        },
        data_columns={
            "prompt_columns": "prompt",
            "chosen_column": "chosen",
            "rejected_column": "rejected",
        },
    ),
    "grpo": StageDef(
        name="grpo",
        summary="online RL with trl's GRPOTrainer and reward functions from the config",
        runner="stagetune.trainer.stages.grpo:run_grpo",
        params={
            **_OPTIMISATION,
            **_SYSTEMS,
            "beta": ParamDef("float", low=0.0, high=100.0, help="KL weight (0 = no reference)"),
            "num_generations": ParamDef("int", low=2, high=1024, help="completions per prompt"),
            "temperature": ParamDef("float", positive=True, high=10.0),
        },
        fixed_only={
            **_COMMON_FIXED,
            "max_completion_length": ParamDef("int", low=1, high=1_048_576),
            "reward_functions": ParamDef("str", help="comma-separated names"),
        },
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

#: Stage names <-> ``stagetune.v1.Stage`` values (``"sft"`` <-> ``STAGE_SFT``).
STAGE_NAMES: EnumNames[str, pb.Stage] = EnumNames(pb.Stage, "STAGE_", tuple(STAGES))
