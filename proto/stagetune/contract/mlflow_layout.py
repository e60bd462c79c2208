"""Where things are in MLflow, for both sides: the server's tracking (which makes the runs
and registers models) and a trial (which logs its saved model into its own run).

A study's runs live in the experiment ``experiment_name(stage)``; each trial's run carries
the tag ``TRIAL_ID_TAG`` with its trial id, so a trial finds its run without being told its
id. A trial that saves its model logs the folder under ``MODEL_ARTIFACT`` in that run, with
``DATA_TAG_PREFIX`` tags that say what data it trained on (each file and its SHA-256); the
server copies those tags onto the registered model version.

Every stagetune process calls ``no_telemetry()`` before it imports mlflow: MLflow 3's
import starts a thread that fetches a config from config.mlflow-telemetry.io and then
posts usage events. A tuning service on a training cluster makes no network call its
users did not ask for; a user who wants MLflow's telemetry sets
MLFLOW_DISABLE_TELEMETRY=false.
"""

from __future__ import annotations

import os

__all__ = [
    "no_telemetry",
    "experiment_name",
    "PIPELINE_EXPERIMENT",
    "TRIAL_ID_TAG",
    "MODEL_ARTIFACT",
    "DATA_TAG_PREFIX",
]

TRIAL_ID_TAG = "stagetune.trial_id"
MODEL_ARTIFACT = "model"
DATA_TAG_PREFIX = "stagetune.data."
PIPELINE_EXPERIMENT = "stagetune/pipelines"


def experiment_name(stage: str) -> str:
    return f"stagetune/{stage}"


def no_telemetry() -> None:
    """MLflow's usage telemetry off in this process and the processes it starts, unless
    MLFLOW_DISABLE_TELEMETRY is set already. Call before mlflow is imported."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
