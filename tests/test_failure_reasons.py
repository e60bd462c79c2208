"""A failed trial explains itself: the headline names how it ended and the Python error,
and the end of its log survives however long the traceback was."""

from __future__ import annotations

from stagetune.trainer.trial_launch import failure_reason

TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "run_trial.py", line 80, in main\n'
    + '  File "x.py", line 1, in f\n' * 400
    + "ValueError: runner.data.path: column 'output' is missing"
)


def test_the_headline_names_the_exit_and_the_python_error() -> None:
    reason = failure_reason("exit code 1", TRACEBACK, "loading data\nboom")
    assert reason.splitlines()[0] == (
        "exit code 1: ValueError: runner.data.path: column 'output' is missing"
    )


def test_a_long_traceback_is_cut_from_the_middle_keeping_headline_and_log_end() -> None:
    reason = failure_reason("exit code 1", TRACEBACK, "step 3 of 8\nlast line of the log")
    assert len(reason) <= 4000
    assert reason.startswith("exit code 1: ValueError:")
    assert reason.endswith("last line of the log")


def test_an_error_only_in_the_log_still_reaches_the_headline() -> None:
    # The trial died before it could write a result (e.g. while importing its runner).
    log = "Traceback (most recent call last):\n  ...\nModuleNotFoundError: No module named 'x'"
    reason = failure_reason("exit code 1", "", log)
    assert reason.splitlines()[0] == "exit code 1: ModuleNotFoundError: No module named 'x'"


def test_a_kill_without_a_python_error_says_only_how_it_ended() -> None:
    reason = failure_reason("killed by SIGKILL (possibly out of host memory)", "", "step 2")
    assert reason.splitlines()[0] == "killed by SIGKILL (possibly out of host memory)"
