"""Rung evaluation inside a trial: evaluate at the server's rung steps, report, obey STOP.

Rank 0 reports to the server; the decision is broadcast so every rank stops together.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from transformers import TrainerCallback

from stagetune.contract.spec import MAX_MAGNITUDE

__all__ = ["Reporter", "NullReporter", "GrpcReporter", "RungCallback"]


class Reporter(Protocol):
    def report(self, step: int, metrics: dict[str, float]) -> tuple[bool, str]:
        """Send rung metrics; returns (stop?, reason)."""
        ...


class NullReporter:
    """No server (tests, local runs): always continue; remembers what was reported."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, float]]] = []

    def report(self, step: int, metrics: dict[str, float]) -> tuple[bool, str]:
        self.calls.append((step, dict(metrics)))
        return False, ""


class GrpcReporter:
    """Reports to the stagetune server with the typed client."""

    def __init__(self, server: str, trial_id: int, worker_id: str) -> None:
        from stagetune.contract.client import WorkerClient

        self._client = WorkerClient(server)
        self._trial_id = trial_id
        self._worker_id = worker_id

    def report(self, step: int, metrics: dict[str, float]) -> tuple[bool, str]:
        from stagetune.contract.errors import FailedPrecondition

        try:
            decision = self._client.report_progress(self._trial_id, self._worker_id, step, metrics)
        except FailedPrecondition as e:  # reaped, stopped or finished: stop, report nothing
            return True, e.message
        return decision.stop, decision.reason


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


class RungCallback(TrainerCallback):
    """Evaluates at each rung step; rank 0 reports; all ranks stop on STOP.

    By default a rung runs the Trainer's own evaluation and reports the entries of
    ``metric_map`` (Trainer key -> metric name; ``eval_loss`` unless told otherwise). A
    stage whose quality is not an evaluation loss (GRPO's mean reward) passes ``evaluate``,
    called on every rank at the rung step instead.
    """

    def __init__(
        self,
        rung_steps: list[int],
        reporter: Reporter,
        extra: Callable[[], dict[str, float]] | None = None,
        metric_map: dict[str, str] | None = None,
        evaluate: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.rung_steps = set(rung_steps)
        self.reporter = reporter
        self.extra = extra  # cheap measurements taken at each rung (e.g. peak memory so far)
        self.metric_map = metric_map if metric_map is not None else {"eval_loss": "eval_loss"}
        self.evaluate = evaluate
        self.rungs: list[dict[str, Any]] = []
        self.stopped = False
        self.reason = ""
        self.first_step: float | None = None  # wall clock when the first step began

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.first_step is None:
            self.first_step = time.time()
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step in self.rung_steps:
            if self.evaluate is None:
                control.should_evaluate = True
            else:
                self._rung(state, control, self.evaluate())
        return control

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any
    ) -> Any:
        values: dict[str, float] = {}
        for theirs, ours in self.metric_map.items():
            value = (metrics or {}).get(theirs)
            if isinstance(value, (int, float)):
                values[ours] = float(value)
        return self._rung(state, control, values)

    def _rung(self, state: Any, control: Any, values: dict[str, float]) -> Any:
        step = int(state.global_step)
        if step not in self.rung_steps or any(r["step"] == step for r in self.rungs):
            return control
        if "eval_loss" in values and math.isfinite(values["eval_loss"]):
            # A diverged run's perplexity is capped at the server's bound on metric values.
            perplexity = math.exp(min(values["eval_loss"], 50.0))
            values["perplexity"] = min(perplexity, MAX_MAGNITUDE)
        if self.extra is not None:
            values.update(self.extra())
        self.rungs.append({"step": step, "metrics": values})
        decision: tuple[bool, str] = (False, "")
        if state.is_world_process_zero:
            decision = self.reporter.report(step, values)
        stop, reason = _broadcast(decision)
        if stop:
            self.stopped, self.reason = True, reason
            control.should_training_stop = True
        return control
