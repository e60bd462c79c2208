"""What a multi-process or DeepSpeed trial needs beyond a one-process one: the DeepSpeed
config for a trial's settings, DeepSpeed on CPU, the whole model out of ZeRO-3 shards, and
what a preference trainer compares its policy against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stagetune.contract.packaged import packaged_path
from stagetune.contract.training import TrainingSettings

__all__ = ["deepspeed_config", "deepspeed_on_cpu", "reference_kind", "whole_model"]


def deepspeed_config(training: TrainingSettings) -> str | None:
    """The DeepSpeed JSON for these settings: a config of the team's own, or ZeRO-N."""
    if training.deepspeed_config:
        path = Path(training.deepspeed_config)
        if not path.exists():
            raise ValueError(f"runner.training.deepspeed_config: {path} does not exist")
        return str(path)
    if training.zero_stage == 0:
        return None
    try:
        return str(packaged_path(f"deepspeed/zero{training.zero_stage}.json"))
    except FileNotFoundError as e:
        raise ValueError(f"runner.training.zero_stage: {e}") from None


def deepspeed_on_cpu() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (C++) on first
    use: minutes on a small machine and a hard failure without a compiler. Plain gloo
    collectives do the same job for CPU trials, so the op is marked unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def whole_model(trainer: Any) -> Any:
    """The trained model with all its weights on rank 0, for decoding and saving.

    Under ZeRO-3 each rank holds a shard: every rank gathers the full state dict (a
    collective), the global ZeRO-3 switch is turned off (so ``generate`` does not wait for
    the other ranks), and rank 0 loads the weights into a plain copy of the model.
    """
    engine = trainer.model_wrapped
    stage = getattr(engine, "zero_optimization_stage", lambda: 0)()
    if stage != 3:
        return trainer.model
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    state = trainer.accelerator.get_state_dict(engine)
    unset_hf_deepspeed_config()
    if not trainer.is_world_process_zero():
        return trainer.model
    model = trainer.model
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        from peft import get_peft_model

        base = model.get_base_model()
        copy = get_peft_model(type(base)(base.config), model.peft_config["default"])
    else:
        copy = type(model)(model.config)
    copy.load_state_dict(state)
    return copy


def reference_kind(trainer: Any) -> str:
    """What the trainer compares the policy against (DPO, GRPO with beta > 0)."""
    if getattr(trainer, "ref_model", None) is not None:
        return "separate reference model"
    adapters = getattr(trainer.model, "peft_config", None)
    if isinstance(adapters, dict) and "ref" in adapters:
        return "frozen copy of the starting adapter"
    if adapters and hasattr(trainer, "ref_model"):
        return "the policy with its adapter disabled"
    return "none"
