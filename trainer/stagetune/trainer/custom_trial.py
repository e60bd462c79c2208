"""Entry point of a custom-stage trial process:
``accelerate launch ... -m stagetune.trainer.custom_trial ASSIGNMENT --script PATH``.

The worker chose PATH from the scripts its operator allows, never from the study. Every
rank runs the script here as ``__main__`` (its folder first on ``sys.path``, as
``python PATH`` would), with the assignment's path in ``$STAGETUNE_ASSIGNMENT`` for
``stagetune.sdk.current_trial()``. The script reports rungs and final metrics through the
SDK, which writes the result file on rank 0; what the SDK cannot see is caught here, as
``run_trial`` does for the built-in runners: an out-of-memory error is reported as such (an
infeasible configuration, not a crash), any other error with its type and message, and a
script that ends without ``complete()`` or a stop as an error that says so.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from stagetune.trainer.assignment import Assignment, TrialResult, process_rank

__all__ = ["ASSIGNMENT_ENV", "main"]

#: Where a trial process finds its assignment file (set by the worker for every trial).
ASSIGNMENT_ENV = "STAGETUNE_ASSIGNMENT"


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")  # a script that never imported torch had no CUDA OOM
    return torch is not None and isinstance(e, torch.OutOfMemoryError)


def _status(result_path: Path) -> str:
    """How the script said it ended through the SDK ("stopped", "complete"); "" if not."""
    return TrialResult.read(result_path).status if result_path.exists() else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a team's training script as one stagetune trial (started by a worker)."
    )
    parser.add_argument("assignment", type=Path, help="assignment JSON written by the worker")
    parser.add_argument("--script", type=Path, required=True, help="the allowed script to run")
    args = parser.parse_args(argv)
    assignment_path = args.assignment.resolve()
    a = Assignment.read(assignment_path)
    os.environ[ASSIGNMENT_ENV] = str(assignment_path)
    result_path = Path(a.result_path)
    rank0 = process_rank() == 0
    script = args.script.resolve()
    sys.argv = [str(script)]
    sys.path.insert(0, str(script.parent))
    code = 0
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code and rank0 and _status(result_path) != "stopped":
            # Worded as the error it is, so the failure's headline names it.
            why = f"SystemExit: script {script.name} exited with status {code}"
            if isinstance(e.code, str):
                why = f"SystemExit: {e.code} (script {script.name})"
            TrialResult("error", reason=why).write(result_path)
    except Exception as e:
        oom = _out_of_memory(e)
        if rank0 and _status(result_path) != "stopped":
            reason = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"[-6000:]
            TrialResult("out_of_memory" if oom else "error", reason=reason).write(result_path)
        if oom:
            return 3
        raise
    if code == 0 and rank0 and not _status(result_path):
        TrialResult(
            "error",
            reason=f"RuntimeError: script {script.name} ended without calling complete(metrics) "
            "and was not stopped: report the final metrics with stagetune.sdk's "
            "current_trial().complete(...) or the StagetuneCallback",
        ).write(result_path)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
