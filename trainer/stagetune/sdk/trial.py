"""The trial a training process was started for, as its script sees it.

A worker writes one assignment file per trial and starts every rank with its path in
``$STAGETUNE_ASSIGNMENT``; ``current_trial()`` reads it, so every rank sees the same
params. The script trains to ``max_steps``, calls ``report(step, metrics)`` at each of
``rung_steps`` and obeys the answer, and ends with ``complete(metrics)``.

Ranks: ``report`` is collective, like any torch.distributed call. Every rank calls it at
the same steps; rank 0's metrics go to the server and rank 0's answer comes back to every
rank (a ``broadcast_object_list`` when torch.distributed is initialised, else a small
file beside the result file). ``complete`` is rank 0's: other ranks may call it, and it
does nothing there. Only rank 0 talks to the server.

The worker, not the script, completes the trial with the server: ``complete`` and a stop
write the trial's result file, which the worker reads when the process ends, checking that
every objective the study names is there. Both add ``peak_memory_mb`` and
``device_seconds`` (this process's peak memory; wall seconds since it started times the
processes) unless the script gives its own.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from stagetune.contract.errors import FailedPrecondition
from stagetune.trainer.assignment import Assignment, ParamValue, TrialResult, process_rank
from stagetune.trainer.custom_trial import ASSIGNMENT_ENV

__all__ = ["ASSIGNMENT_ENV", "Decision", "NoTrial", "Trial", "current_trial", "in_trial"]

#: How long a rank other than 0 waits for rank 0's answer to a report (no torch.distributed).
DECISION_TIMEOUT_S = 600.0


class NoTrial(RuntimeError):
    """This process was not started by a stagetune worker."""


@dataclass(frozen=True)
class Decision:
    """The server's answer to a rung report: go on, or stop now (and why)."""

    stop: bool
    reason: str = ""


def _process_seconds() -> float:
    """Wall seconds since this process started."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except ImportError:  # psutil comes with stagetune[worker]; without it, since import
        return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()


def _finite(metrics: Mapping[str, float], where: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in metrics.items():
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{where}: {name} = {value} is not finite")
        out[str(name)] = number
    return out


class Trial:
    """One leased trial: its params, its budget, and the calls that report on it."""

    def __init__(self, assignment: Assignment) -> None:
        self._a = assignment
        self.rank = process_rank()
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._rungs: list[dict[str, Any]] = []
        self._reports = 0
        self._stopped: Decision | None = None
        self._final: dict[str, float] = {}
        self._client: Any = None

    # ------------------------------------------------------------ what was leased

    @property
    def trial_id(self) -> int:
        return self._a.trial_id

    @property
    def study_name(self) -> str:
        return self._a.study_name

    @property
    def number(self) -> int:
        """The trial's number in its study (0, 1, ...)."""
        return self._a.number

    @property
    def params(self) -> Mapping[str, ParamValue]:
        """The values the server sampled for this trial, by search-space name."""
        return MappingProxyType(self._a.params)

    @property
    def settings(self) -> Mapping[str, Any]:
        """Every value the study sets: its fixed ``runner.training`` values with the
        sampled params on top. A name the study does not set is absent: the script's own
        default applies."""
        fixed = self._a.runner.get("training") or {}
        return MappingProxyType({**fixed, **self._a.params})

    @property
    def rung_steps(self) -> tuple[int, ...]:
        """Steps at which to ``report``; the last is the full budget."""
        return tuple(self._a.rung_steps)

    @property
    def max_steps(self) -> int:
        """The trial's budget in training steps: train this far unless told to stop."""
        return self._a.rung_steps[-1]

    @property
    def objectives(self) -> tuple[str, ...]:
        """The metrics the study optimises: ``complete`` must report each of them."""
        return tuple(self._a.objectives)

    @property
    def output_dir(self) -> Path:
        """This trial's scratch folder (checkpoints); ``output_dir/model`` is kept when the
        study sets ``runner.save_model``."""
        return Path(self._a.output_dir)

    @property
    def seed(self) -> int:
        """A seed for this trial (the study's sampler seed plus the trial's number)."""
        return self._a.seed

    @property
    def stopped(self) -> Decision | None:
        """The stop decision, once the server has stopped this trial; else None."""
        return self._stopped

    # ------------------------------------------------------------ reporting

    def _measured(self, metrics: dict[str, float]) -> dict[str, float]:
        from stagetune.objectives.measure import peak_memory_mb

        metrics.setdefault("peak_memory_mb", peak_memory_mb())
        metrics.setdefault("device_seconds", _process_seconds() * max(1, self.world_size))
        return metrics

    def report(self, step: int, metrics: Mapping[str, float]) -> Decision:
        """Report rung metrics (finite numbers, by metric name) at training step ``step``;
        returns whether to go on. Call it on every rank at the same steps (see the module
        docstring). Once stopped, every later call answers the same stop without a call to
        the server: stop training and let the script end."""
        if self._stopped is not None:
            return self._stopped
        if step <= 0:
            raise ValueError(f"step: must be > 0, got {step}")
        values = self._measured(_finite(metrics, "report"))
        decision = Decision(False)
        if self.rank == 0:
            decision = self._ask_server(step, values)
        decision = self._shared(decision)
        self._rungs.append({"step": int(step), "metrics": values})
        if decision.stop:
            self._stopped = decision
            if self.rank == 0:
                TrialResult("stopped", rungs=self._rungs, reason=decision.reason).write(
                    Path(self._a.result_path)
                )
        return decision

    def complete(self, metrics: Mapping[str, float]) -> None:
        """The trial's final metrics: at least every one of ``objectives``. May be called
        again (a script adding a metric after the callback completed): later values add
        to, and replace, earlier ones. Does nothing after a stop, and on ranks other than 0."""
        if self._stopped is not None or self.rank != 0:
            return
        self._final.update(_finite(metrics, "complete"))
        final = self._measured(dict(self._final))
        TrialResult("complete", metrics=final, rungs=self._rungs).write(Path(self._a.result_path))

    # ------------------------------------------------------------ plumbing

    def _ask_server(self, step: int, metrics: dict[str, float]) -> Decision:
        if not self._a.server:  # an assignment without a server (a dry run): go on
            return Decision(False)
        if self._client is None:
            from stagetune.contract.client import WorkerClient

            # Credentials come from the worker through $STAGETUNE_TOKEN / $STAGETUNE_TLS_*.
            self._client = WorkerClient(self._a.server)
        try:
            answer = self._client.report_progress(
                self._a.trial_id, self._a.worker_id, step, metrics
            )
        except FailedPrecondition as e:  # reaped, stopped or finished elsewhere: stop
            return Decision(True, e.message)
        return Decision(answer.stop, answer.reason)

    def _shared(self, decision: Decision) -> Decision:
        """Rank 0's decision, on every rank."""
        self._reports += 1
        if self.world_size <= 1:
            return decision
        dist = _distributed()
        if dist is not None:
            box: list[Any] = [(decision.stop, decision.reason)]
            dist.broadcast_object_list(box, src=0)
            stop, reason = box[0]
            return Decision(bool(stop), str(reason))
        path = Path(self._a.result_path).with_name(f"decision-{self._reports}.json")
        if self.rank == 0:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"stop": decision.stop, "reason": decision.reason}))
            os.replace(tmp, path)
            return decision
        deadline = time.monotonic() + DECISION_TIMEOUT_S
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 gave no answer to report {self._reports}")
            time.sleep(0.05)
        shared = json.loads(path.read_text())
        return Decision(bool(shared["stop"]), str(shared["reason"]))


def _distributed() -> Any:
    """torch.distributed when a process group is up (never imports torch itself)."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


_CURRENT: dict[str, Trial] = {}  # by assignment path: one Trial per trial, however asked


def in_trial() -> bool:
    """Whether a stagetune worker started this process for a trial."""
    return bool(os.environ.get(ASSIGNMENT_ENV))


def current_trial() -> Trial:
    """The trial this process runs, read once from the worker's assignment file (the same
    file on every rank). ``NoTrial`` when no worker started this process."""
    path = os.environ.get(ASSIGNMENT_ENV)
    if not path:
        raise NoTrial(
            f"no stagetune trial here: ${ASSIGNMENT_ENV} is not set (start this script "
            "from a worker: stagetune worker --allow-script NAME=PATH)"
        )
    if path not in _CURRENT:
        _CURRENT[path] = Trial(Assignment.read(Path(path)))
    return _CURRENT[path]
