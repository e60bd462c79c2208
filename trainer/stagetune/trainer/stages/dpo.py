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
"""

from __future__ import annotations

from typing import Any

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.training import DPOTraining
from stagetune.trainer.assignment import Assignment, TrialResult
from stagetune.trainer.rungs import Reporter
from stagetune.trainer.stages.common import Trial, trainer_quality

__all__ = ["run_dpo", "METRIC_MAP"]

#: DPOTrainer's evaluation keys -> stagetune metric names.
METRIC_MAP = {"eval_rewards/accuracies": "reward_accuracy", "eval_rewards/margins": "reward_margin"}


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
