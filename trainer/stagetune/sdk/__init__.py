"""stagetune's SDK for a team's own training code: the trial a worker started it for.

``from stagetune.sdk import current_trial`` (``stagetune`` itself is a namespace package
spread over several folders, so it has no attributes of its own: the SDK lives here)::

    trial = current_trial()              # the leased params, identical on every rank
    lr = trial.settings.get("learning_rate", 5e-5)
    for step in range(1, trial.max_steps + 1):
        train_one_step(lr)
        if step in trial.rung_steps and trial.report(step, {"eval_loss": evaluate()}).stop:
            break                        # MO-ASHA (or a stopped study) ended this trial
    else:
        trial.complete({"eval_loss": evaluate()})

A Hugging Face ``Trainer`` (or any TRL trainer) needs only
``stagetune.integrations.transformers.StagetuneCallback``. A worker runs such a script for
a ``custom`` study when its operator allows it: ``stagetune worker --allow-script
finetune=train.py``; the study names it with ``runner.script: finetune``.
"""

from stagetune.sdk.trial import (
    ASSIGNMENT_ENV,
    Decision,
    NoTrial,
    Trial,
    current_trial,
    in_trial,
)

__all__ = ["ASSIGNMENT_ENV", "Decision", "NoTrial", "Trial", "current_trial", "in_trial"]
