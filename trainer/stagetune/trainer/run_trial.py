"""Entry point of a trial process: ``accelerate launch ... -m stagetune.trainer.run_trial FILE``.

Every rank reads the same assignment file. Rank 0 writes the TrialResult the worker turns
into CompleteTrial or FailTrial; an out-of-memory error is reported as such, not as a crash,
and a bad config (a data file without a mapped column, splits that overlap above
``runner.data.max_overlap``) as one line naming the field, before any model loads (exit 2).

``--stop-after STEP`` ends the trial at that rung as if the server had said STOP there:
``stagetune reproduce`` re-runs a trial that was stopped early, with no server.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from stagetune.contract.datafiles import check_data_source
from stagetune.contract.errors import FailedPrecondition, InvalidArgument
from stagetune.contract.spec import parse_runner
from stagetune.contract.stages import STAGES
from stagetune.trainer.assignment import Assignment, TrialResult, free_port, process_rank
from stagetune.trainer.rungs import GrpcReporter, NullReporter, Reporter
from stagetune.trainer.tasks import STAGE_EXAMPLES, prepare_splits
from stagetune.trainer.trial_launch import uses_deepspeed

__all__ = ["main"]


def _runner(stage: str) -> Callable[[Assignment, Reporter], TrialResult] | None:
    """The stage's runner as the stage registry names it, imported only in the trial
    process (it pulls in torch)."""
    known = STAGES.get(stage)
    if known is None:
        return None
    module, _, function = known.runner.partition(":")
    runner: Callable[[Assignment, Reporter], TrialResult] = getattr(
        importlib.import_module(module), function
    )
    return runner


def _single_process_rendezvous() -> None:
    """A one-process DeepSpeed trial still gets a rank, a world size and a rendezvous
    address: DeepSpeed initialises torch.distributed even for one process (and otherwise
    looks for MPI). The launcher sets these for multi-process trials. Any other one-process
    trial gets none: with a world size the Trainer would wrap the model in DDP and start a
    process group for a world of one, at a cost to every start and every step."""
    if "WORLD_SIZE" in os.environ:
        return
    port = free_port()
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**defaults, "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def _config_error(a: Assignment) -> str | None:
    """What is wrong with the trial's runner section or params here, on this worker (its
    data file missing, or lacking a mapped column; its splits overlapping above the
    limit, with the counts), naming the field; None when nothing is. Checked before any
    model loads, so a bad config fails the trial in a line, not a traceback. The splits
    prepared here are cached for the stage runner."""
    try:
        runner = parse_runner(a.stage, a.runner, a.params)
        check_data_source(a.stage, runner.data, must_exist=True)
        kind = STAGE_EXAMPLES.get(a.stage)
        if kind is not None:
            prepare_splits(kind, runner.data)
    except InvalidArgument as e:
        return e.message
    except FailedPrecondition as e:  # OverlapRefused: the counts, in one line
        return e.message
    return None


class _StopAfter:
    """Passes reports on, and says STOP at ``step`` (``--stop-after``)."""

    def __init__(self, inner: Reporter, step: int) -> None:
        self.inner = inner
        self.step = step

    def report(self, step: int, metrics: dict[str, float]) -> tuple[bool, str]:
        stop, reason = self.inner.report(step, metrics)
        if step >= self.step and not stop:
            return True, f"stopped at step {step} (--stop-after {self.step})"
        return stop, reason


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one stagetune trial (started by a worker).")
    parser.add_argument("assignment", type=Path, help="assignment JSON written by the worker")
    parser.add_argument(
        "--stop-after", type=int, metavar="STEP", help="stop at this rung, as a server would"
    )
    args = parser.parse_args(argv)
    a = Assignment.read(args.assignment)
    if uses_deepspeed(a):
        _single_process_rendezvous()
    rank0 = process_rank() == 0
    runner = _runner(a.stage)
    if runner is None:
        if rank0:
            TrialResult("error", reason=f"no runner for stage {a.stage!r}").write(
                Path(a.result_path)
            )
        return 1
    why = _config_error(a)
    if why is not None:
        if rank0:
            TrialResult("error", reason=f"invalid config: {why}").write(Path(a.result_path))
        return 2
    reporter: Reporter = (
        GrpcReporter(a.server, a.trial_id, a.worker_id) if a.server and rank0 else NullReporter()
    )
    if args.stop_after is not None:
        reporter = _StopAfter(reporter, args.stop_after)
    try:
        result = runner(a, reporter)
    except Exception as e:
        import torch

        oom = isinstance(e, (torch.OutOfMemoryError, MemoryError))
        if rank0:
            reason = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"[-6000:]
            failed = TrialResult("out_of_memory" if oom else "error", reason=reason)
            failed.write(Path(a.result_path))
        if oom:
            return 3
        raise
    if rank0:
        result.write(Path(a.result_path))
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Leave the ranks' process group, if the trial made one, before the interpreter
    exits: left to the interpreter's teardown, gloo's threads can abort a rank (SIGABRT,
    "terminate called without an active exception") after the trial trained and its
    result was written, and the launch then exits non-zero."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
