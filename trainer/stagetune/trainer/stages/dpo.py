"""The DPO stage: preference tuning with trl's DPOTrainer.

The base model is usually an SFT or LoRA result (``runner.model.name_or_path``: a saved
model folder, an adapter folder, or an MLflow artifact URI). The reference model is left
to trl: for a full model it is the same weights reloaded from that folder; for a LoRA
adapter it is a frozen copy of the adapter (see ``common.load_model``).

Quality: eval reward accuracy (the fraction of held-out pairs whose implicit reward ranks
chosen above rejected) and the mean reward margin, at every rung. The implicit reward is
measured against a reference: the starting model, or ``runner.reference_model``. An
evaluation (``runner.evaluate``) scores a trained policy (``runner.model``) against the model
it was trained from, which it therefore needs as ``runner.reference_model``.

With ``lora_r`` > 0 a trial trains a new LoRA adapter on the starting model instead of the
whole model; trl then takes the reference from the same weights with the adapter off, so
the trial holds one copy of the model and optimizer state for the adapter alone: rank,
batch size and gradient checkpointing are what move a DPO trial's memory and cost.
"""

from __future__ import annotations

from typing import Any

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.training import DPOTraining
from stagetune.trainer.assignment import Assignment, TrialResult
from stagetune.trainer.rungs import Reporter
from stagetune.trainer.stages.common import Trial, trainer_quality
from stagetune.trainer.stages.lora import lora_config

__all__ = ["run_dpo", "new_adapter", "METRIC_MAP"]

#: DPOTrainer's evaluation keys -> stagetune metric names.
METRIC_MAP = {"eval_rewards/accuracies": "reward_accuracy", "eval_rewards/margins": "reward_margin"}


def new_adapter(settings: DPOTraining, model: Any, reference: Any | None) -> Any | None:
    """The LoRA adapter to train when ``lora_r`` > 0 (trl then scores the reference with the
    adapter switched off, so no second copy of the model is held); None for a full-model
    trial or an evaluation."""
    from peft import PeftModel

    if settings.lora_r == 0:
        return None
    if isinstance(model, PeftModel):
        raise ValueError(
            "lora_r: runner.model is already a LoRA adapter, which a DPO trial trains as it "
            "is; leave lora_r at 0 (or start from a merged model)"
        )
    if reference is not None:
        raise ValueError(
            "lora_r: a new adapter's reference is its own base with the adapter off; "
            "drop runner.reference_model or leave lora_r at 0"
        )
    return lora_config(settings)


def run_dpo(a: Assignment, reporter: Reporter) -> TrialResult:
    from trl import DPOConfig, DPOTrainer  # type: ignore[attr-defined]

    with Trial(a, reporter, DPOTraining) as t:
        data = t.data()
        held_out = data.dataset(data.held_out)
        reference = t.load_reference()
        if t.evaluating:
            if reference is None:
                raise InvalidArgument(
                    "runner.reference_model",
                    "evaluating a DPO model needs the model it was trained from",
                )
            # A plain (merged) policy: the reference is the separate model given.
            model, tokenizer = t.load_model()
            train = held_out  # trl insists on one; an evaluation never calls train()
        else:
            model, tokenizer = t.load_model(keep_adapter=True)
            train = data.dataset("train")
        adapter = None if t.evaluating else new_adapter(t.settings, model, reference)
        loss = t.settings.loss_type
        args = DPOConfig(
            **t.training_args(),
            beta=t.settings.beta,
            loss_type=[loss],
            label_smoothing=1e-3 if loss == "exo_pair" else 0.0,  # exo_pair needs > 0
            max_length=t.settings.max_length,
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=reference,
            args=args,
            train_dataset=train,
            eval_dataset=held_out,
            processing_class=tokenizer,
            peft_config=adapter,
            callbacks=[t.rung_callback(metric_map=METRIC_MAP)],
        )
        kept: list[tuple[str, Any]] = [(data.held_out, trainer.eval_dataset)]
        if not t.evaluating:
            kept.insert(0, ("training", trainer.train_dataset))
        for name, rows in kept:
            if len(rows) == 0:  # trl drops pairs whose prompt alone fills max_length
                raise ValueError(
                    f"runner.training.max_length: every {name} example's prompt fills "
                    f"{t.settings.max_length} tokens; raise max_length"
                )
        if t.evaluating:
            return t.evaluate(
                trainer.model, tokenizer, lambda: trainer_quality(trainer, METRIC_MAP)
            )
        return t.train(trainer, tokenizer)
