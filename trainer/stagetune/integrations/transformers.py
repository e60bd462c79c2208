"""``StagetuneCallback``: tune a Hugging Face ``Trainer`` (or any TRL trainer) with stagetune.

::

    from stagetune.integrations.transformers import StagetuneCallback
    from stagetune.sdk import current_trial

    trial = current_trial()
    args = TrainingArguments(
        output_dir=str(trial.output_dir),
        max_steps=trial.max_steps,
        learning_rate=trial.settings.get("learning_rate", 5e-5),
        ...
    )
    trainer = Trainer(..., eval_dataset=held_out, callbacks=[StagetuneCallback(trial)])
    trainer.train()

At each rung step the callback asks the Trainer for an evaluation, reports its metrics
(every number ``evaluate`` returns, ``eval_exact_match`` also as ``exact_match`` when the
catalog knows that name, and ``perplexity`` from ``eval_loss``) and, when the server says
stop, sets ``control.should_training_stop``. When training ends at the full budget it
completes the trial with the last evaluation's metrics. Any number of objectives: unlike
Optuna's ``trial.report``, nothing here refuses a multi-objective study; the server ranks
the whole vector (MO-ASHA).

Every rank runs the callback (the Trainer evaluates on all of them), so the report is
collective and every rank stops together (``stagetune.sdk.trial``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback

from stagetune.contract.spec import MAX_MAGNITUDE
from stagetune.objectives.catalog import METRICS
from stagetune.sdk.trial import Trial, current_trial

__all__ = ["StagetuneCallback"]


class StagetuneCallback(TrainerCallback):
    """Evaluates at the trial's rung steps, reports, stops when told, completes at the end.

    ``trial``: the trial (default: ``current_trial()``). ``metric_map``: Trainer metric ->
    stagetune metric, for names the defaults do not cover (``{"eval_rewards/accuracies":
    "reward_accuracy"}``). ``complete``: complete the trial when training ends (False when
    the script completes it itself, after an evaluation of its own).
    """

    def __init__(
        self,
        trial: Trial | None = None,
        *,
        metric_map: Mapping[str, str] | None = None,
        complete: bool = True,
    ) -> None:
        self.trial = trial if trial is not None else current_trial()
        self.metric_map = dict(metric_map or {})
        self.complete_at_end = complete
        self.rung_steps = frozenset(self.trial.rung_steps)
        self.reported: dict[int, dict[str, float]] = {}

    def metrics(self, raw: Mapping[str, Any]) -> dict[str, float]:
        """What a rung reports of the Trainer's evaluation metrics ``raw``."""
        out: dict[str, float] = {}
        for key, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            out[key] = float(value)
            bare = key.removeprefix("eval_")
            if bare != key and bare != "loss" and bare in METRICS:
                out.setdefault(bare, float(value))
        for theirs, ours in self.metric_map.items():
            if theirs in out:
                out[ours] = out[theirs]
        if "eval_loss" in out:
            # A diverged run's perplexity is capped at the server's bound on metric values.
            out.setdefault("perplexity", min(math.exp(min(out["eval_loss"], 50.0)), MAX_MAGNITUDE))
        return out

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.max_steps < self.trial.max_steps:
            raise ValueError(
                f"the Trainer stops at step {state.max_steps}, before the trial's budget of "
                f"{self.trial.max_steps} steps: set TrainingArguments(max_steps=trial.max_steps)"
            )
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step in self.rung_steps and state.global_step not in self.reported:
            control.should_evaluate = True
        return control

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
    ) -> Any:
        step = int(state.global_step)
        if step not in self.rung_steps or step in self.reported:
            return control
        values = self.metrics(metrics or {})
        self.reported[step] = values
        decision = self.trial.report(step, values)
        # The last rung is the trial's whole budget: a Trainer set to run longer ends here.
        if decision.stop or step >= self.trial.max_steps:
            control.should_training_stop = True
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not self.complete_at_end or self.trial.stopped is not None:
            return control
        final = self.reported.get(self.trial.max_steps)
        if final is None:
            raise RuntimeError(
                f"training ended at step {state.global_step} without an evaluation at the "
                f"trial's budget ({self.trial.max_steps} steps): nothing to complete it with"
            )
        self.trial.complete(final)
        return control
