"""The assignment file: what every rank of a trial process reads.

The worker writes one JSON file per trial before it launches the trial processes; every
rank reads the same file, so DeepSpeed/accelerate ranks never disagree about params.
The trial process writes its outcome to ``result_path`` (rank 0 only).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from stagetune.contract.spec import StudySpec, value_from_proto
from stagetune.v1 import types_pb2 as pb

ParamValue = float | int | str | bool

__all__ = ["Assignment", "TrialResult", "ParamValue", "free_port", "process_rank", "trial_seed"]


def process_rank() -> int:
    """This process's rank in its trial, as the launcher set it (0 for one process)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


@dataclass(frozen=True)
class Assignment:
    """One trial to run, as the worker received it from the server."""

    trial_id: int
    study_name: str
    number: int
    attempt: int
    stage: str  # "pretrain_proxy" | "sft" | "lora" | "dpo" | "grpo"
    params: dict[str, ParamValue]
    runner: dict[str, Any]  # StudySpec.runner: {"model": {...}, "data": {...}, "training": {...}}
    rung_steps: list[int]  # evaluate + report at each; the last is the full budget
    objectives: list[str]  # metric names the study optimises
    output_dir: str  # scratch folder of this trial (checkpoints, adapters)
    result_path: str  # where rank 0 writes the TrialResult JSON
    server: str = ""  # "host:port" for ReportProgress; empty = no reporting (tests)
    worker_id: str = ""
    seed: int = 0

    @classmethod
    def of_trial(
        cls,
        spec: StudySpec,
        trial: pb.Trial,
        rung_steps: list[int],
        folder: Path,
        seed: int,
        server: str = "",
        worker_id: str = "",
    ) -> Assignment:
        """The assignment of ``trial`` of the study ``spec``, writing into ``folder``: what
        a worker runs a leased trial with, and what ``stagetune reproduce`` re-runs."""
        return cls(
            trial_id=trial.trial_id,
            study_name=trial.study_name,
            number=trial.number,
            attempt=trial.attempt,
            stage=spec.stage,
            params={k: value_from_proto(v) for k, v in trial.params.items()},
            runner=spec.runner,
            rung_steps=list(rung_steps),
            objectives=spec.metric_names,
            output_dir=str(folder / "output"),
            result_path=str(folder / "result.json"),
            server=server,
            worker_id=worker_id,
            seed=seed,
        )

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> Assignment:
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class TrialResult:
    """What a trial process reports back to its worker through ``result_path``."""

    status: Literal["complete", "stopped", "out_of_memory", "error"]
    metrics: dict[str, float] = field(default_factory=dict)  # final metrics (complete only)
    rungs: list[dict[str, Any]] = field(default_factory=list)  # [{"step": 8, "metrics": {..}}]
    reason: str = ""  # why stopped / what failed
    # Wall-clock times (time.time()) of the first training step and of training's end, so
    # the worker can tell a trial's fixed cost from its training.
    timing: dict[str, float] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> TrialResult:
        return cls(**json.loads(Path(path).read_text()))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (a trial's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trial_seed(sampler_seed: int | None, number: int) -> int:
    """The training seed of trial ``number`` of a study: the worker gives it to the trial,
    and ``stagetune reproduce`` falls back on it for a trial that recorded none."""
    return (sampler_seed or 0) + number
