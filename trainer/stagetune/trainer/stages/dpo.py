"""The DPO stage: preference tuning with trl's DPOTrainer.

The base model is usually an SFT or LoRA result (``runner.model.name_or_path``: a saved
model folder, an adapter folder, or an MLflow artifact URI). The reference model is left
to trl: for a full model it is the same weights reloaded from that folder; for a LoRA
adapter it is a frozen copy of the adapter (see ``common.load_model``).

Quality: eval reward accuracy (the fraction of held-out pairs whose implicit reward ranks
chosen above rejected) and the mean reward margin, at every rung.
"""

from __future__ import annotations

from stagetune.contract.training import DPOTraining
from stagetune.trainer.assignment import Assignment, TrialResult
from stagetune.trainer.rungs import Reporter
from stagetune.trainer.stages.common import Trial
from stagetune.trainer.tasks import load_preference_dataset

__all__ = ["run_dpo", "METRIC_MAP"]

#: DPOTrainer's evaluation keys -> stagetune metric names.
METRIC_MAP = {"eval_rewards/accuracies": "reward_accuracy", "eval_rewards/margins": "reward_margin"}


def run_dpo(a: Assignment, reporter: Reporter) -> TrialResult:
    from trl import DPOConfig, DPOTrainer  # type: ignore[attr-defined]

    with Trial(a, reporter, DPOTraining) as t:
        model, tokenizer = t.load_model(keep_adapter=True)
        train, evals = load_preference_dataset(t.runner.data)
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
            ref_model=None,
            args=args,
            train_dataset=train,
            eval_dataset=evals,
            processing_class=tokenizer,
            callbacks=[t.rung_callback(metric_map=METRIC_MAP)],
        )
        return t.train(trainer, tokenizer)
