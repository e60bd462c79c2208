"""A trial's saved model, logged into its MLflow run so that the server can promote it and
workers on other machines can load it by ``models:/`` URI.

Called by rank 0 right after it saved the model (``runner.save_model``), before the trial
reports completion, so the model is in MLflow by the time the server hears the trial is
done. The server opened the trial's run when it handed the trial out; the trial finds it
by its ``stagetune.trial_id`` tag in the stage's experiment (``contract.mlflow_layout``),
waiting a little when MLflow has not shown it yet, and makes it itself as a last resort
(the server's tracker then finds it by the same tag).

Besides the folder (artifact ``model``), the run gets ``stagetune.data.*`` tags: what the
trial trained on (the data file, or the synthetic task) and the SHA-256 of the file's bytes
(of each file of a folder, hashed together), which the server copies onto the registered
model version as its lineage.

The tracking URI is ``MLFLOW_TRACKING_URI`` (the same variable through which a trial
downloads its ``models:/`` base model); without one nothing is logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from stagetune.contract.mlflow_layout import (
    DATA_TAG_PREFIX,
    MODEL_ARTIFACT,
    TRIAL_ID_TAG,
    experiment_name,
    no_telemetry,
)
from stagetune.contract.spec import DataSource, RunnerSettings
from stagetune.trainer.assignment import Assignment

__all__ = ["upload_saved_model", "data_tags", "content_sha256"]

_log = logging.getLogger(__name__)


def content_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes; of a folder, over each file's relative path and bytes in
    sorted order (a saved ``datasets`` folder)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f != path:
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def data_tags(data: DataSource) -> dict[str, str]:
    """What a trial trained on, as ``stagetune.data.*`` tags: the source, its content hash
    (files only: synthetic data is made in code), the sizes read and how it was split."""
    tags = {
        f"{DATA_TAG_PREFIX}train_size": str(data.train_size),
        f"{DATA_TAG_PREFIX}eval_size": str(data.eval_size),
    }
    split: Any = getattr(data, "split", None)  # the split settings, where the runner has them
    if split is not None:
        tags[f"{DATA_TAG_PREFIX}split"] = json.dumps(
            {k: v for k, v in vars(split).items() if v is not None}, sort_keys=True, default=str
        )
    if data.path:
        path = Path(data.path)
        tags[f"{DATA_TAG_PREFIX}source"] = str(path.resolve())
        tags[f"{DATA_TAG_PREFIX}sha256"] = content_sha256(path)
    else:
        tags[f"{DATA_TAG_PREFIX}source"] = f"synthetic:{data.synthetic}"
    return tags


def _trial_run(client: Any, a: Assignment, wait_seconds: float) -> str:
    name = experiment_name(a.stage)
    query = f"tags.`{TRIAL_ID_TAG}` = '{a.trial_id}'"
    deadline = time.monotonic() + wait_seconds
    while True:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            found = client.search_runs([experiment.experiment_id], query, max_results=1)
            if found:
                return str(found[0].info.run_id)
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    exp_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
    _log.warning("trial %d: no MLflow run found; making one to hold its model", a.trial_id)
    run = client.create_run(
        exp_id,
        run_name=f"{a.study_name}/trial-{a.number}",
        tags={
            TRIAL_ID_TAG: str(a.trial_id),
            "stagetune.study": a.study_name,
            "stagetune.kind": "trial",
        },
    )
    return str(run.info.run_id)


def upload_saved_model(
    a: Assignment,
    runner: RunnerSettings,
    model_dir: Path,
    *,
    tracking_uri: str | None = None,
    wait_seconds: float = 60.0,
) -> str | None:
    """Log ``model_dir`` as the artifact ``model`` of the trial's MLflow run, with the
    ``stagetune.data.*`` tags. Returns the run id; None when no tracking URI is known.
    MLflow errors propagate: a model that could not be logged cannot be promoted, so the
    trial fails (and is retried) rather than completing without it."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        _log.info("trial %d: no MLFLOW_TRACKING_URI; the saved model stays local", a.trial_id)
        return None
    no_telemetry()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = _trial_run(client, a, wait_seconds)
    for key, value in data_tags(runner.data).items():
        client.set_tag(run_id, key, value)
    client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
    return run_id
