"""A worker process killed with SIGKILL (before its first report, and mid-trial): its
trial is failed within lease + one reaper interval and retried once with the same params,
never more than the study's retry limit."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stagetune.contract.client import StudyClient
from stagetune.contract.spec import BudgetSpec, StudySpec
from stagetune.v1 import types_pb2 as pb
from tests.conftest import start_server

LEASE, REAPER = 2.0, 0.5

DOOMED = """
import sys, time
from stagetune.contract.client import WorkerClient
wc = WorkerClient(sys.argv[1])
a = wc.acquire(sys.argv[2])
if sys.argv[3] == "report":
    wc.report_progress(a.trial.trial_id, sys.argv[2], 8, {"eval_loss": 2.0})
print(a.trial.trial_id, flush=True)
time.sleep(600)
"""


def doomed_worker(address: str, name: str, report: bool) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", DOOMED, address, name, "report" if report else "quiet"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


@pytest.mark.parametrize("report", [False, True], ids=["before-first-report", "mid-trial"])
def test_a_sigkilled_worker_is_reaped_and_retried_once(
    tmp_path: Path, lora_spec: StudySpec, report: bool
) -> None:
    server = start_server(
        tmp_path,
        storage_url=f"sqlite:///{tmp_path / 'st.db'}",
        tracking_uri="",
        lease_seconds=LEASE,
        reaper_interval=REAPER,
    )
    spec = dataclasses.replace(lora_spec, budget=BudgetSpec(1, 1))  # one retry allowed
    try:
        with StudyClient(server.address) as sc:
            sc.create_study(spec)
            params = None
            for attempt in (1, 2):
                proc, trial_id = doomed_worker(server.address, f"w{attempt}", report)
                os.kill(proc.pid, signal.SIGKILL)
                killed = time.monotonic()
                proc.wait()
                while True:
                    trial = next(t for t in sc.list_trials(spec.name) if t.trial_id == trial_id)
                    if trial.state == pb.TRIAL_STATE_FAILED:
                        break
                    assert time.monotonic() - killed < LEASE + REAPER + 15.0, "not reaped"
                    time.sleep(0.1)
                assert "lease expired" in trial.reason and trial.attempt == attempt
                if params is None:
                    params = dict(trial.params)
                else:
                    assert dict(trial.params) == params  # the retry ran the same config
            # Both attempts used: nothing is queued a third time, the study is over.
            time.sleep(LEASE + REAPER)
            study = sc.get_study(spec.name)
            assert (study.counts.failed, study.counts.waiting) == (2, 0)
            assert study.state == pb.STUDY_STATE_DONE
    finally:
        server.stop(grace=0)
