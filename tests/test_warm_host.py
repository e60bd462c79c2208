"""The warm trial host: trials forked from a process that imported the training stack once
(stagetune.trainer.warm_host), each still its own process. A real server, a real worker and
real trial processes; the scripts below are custom-stage trials, so each trial can do to
its process what a misbehaving training run would (leak, crash, kill itself, kill the
host), and the tiny LoRA study checks that warm and cold trials train the same model."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from stagetune.contract.client import StudyClient
from stagetune.contract.spec import (
    BudgetSpec,
    FidelitySpec,
    FloatParam,
    ObjectiveSpec,
    SamplerConfig,
    StudySpec,
)
from stagetune.server.app import StagetuneServer
from stagetune.trainer.warm_host import rank_environments
from stagetune.trainer.worker import Worker, WorkerSettings
from stagetune.v1 import types_pb2 as pb
from tests.conftest import start_server
from tests.test_e2e_lora import tiny_spec

pytestmark = pytest.mark.slow

# Trial 0 leaves every kind of mess behind; 1 kills itself; 2 segfaults; 3 kills the host
# it was forked from; 4 reports what it inherited.
PROBE = """
import ctypes, json, os, signal, sys, time
preloaded = "transformers" in sys.modules  # before this script imports anything heavy
deepspeed_preloaded = "deepspeed" in sys.modules
import torch
from stagetune.sdk import current_trial

def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

t = current_trial()
seen = {
    "preloaded": float(preloaded),
    "deepspeed_preloaded": float(deepspeed_preloaded),
    "leaked_env": float("STAGETUNE_LEAK" in os.environ),
    "leaked_global": float(hasattr(json, "LEAKED")),
    "leaked_dtype": float(torch.get_default_dtype() == torch.float64),
    "host_pid": float(os.getppid()),
    "host_rss_mb": rss_mb(os.getppid()),
    "eval_loss": 1.0,
    "perplexity": 2.0,
}
if t.number == 0:
    os.environ["STAGETUNE_LEAK"] = "1"
    json.LEAKED = bytearray(300 * 2**20)  # 300 MiB held by a module global
    torch.set_default_dtype(torch.float64)
elif t.number == 1:
    os.kill(os.getpid(), signal.SIGKILL)
elif t.number == 2:
    ctypes.string_at(0)
elif t.number == 3:
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(5)
t.complete(seen)
"""


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[StagetuneServer]:
    srv = start_server(tmp_path, tracking_uri="")
    yield srv
    srv.stop(grace=0)


def _worker(srv: StagetuneServer, tmp_path: Path, study: str, **kw: object) -> Worker:
    settings = WorkerSettings(
        server=srv.address,
        study_name=study,
        worker_id="w-warm",
        threads_per_trial=1,
        work_dir=tmp_path / "work",
        poll_interval=0.2,
        **kw,  # type: ignore[arg-type]
    )
    return Worker(settings)


def test_a_trial_that_leaks_crashes_or_kills_harms_no_later_trial(
    sqlite_server: StagetuneServer, tmp_path: Path
) -> None:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    spec = StudySpec(
        name="warm-isolation",
        stage="custom",
        search_space=(FloatParam("lr", 1e-4, 1e-2, log=True),),
        objectives=(
            ObjectiveSpec("eval_loss", "minimize"),
            ObjectiveSpec("perplexity", "minimize"),
        ),
        fidelity=FidelitySpec(2, 2, 2),
        budget=BudgetSpec(5, 0),
        runner={"script": "probe"},
    )
    with StudyClient(sqlite_server.address) as client:
        client.create_study(spec)
        outcomes = _worker(sqlite_server, tmp_path, spec.name, scripts={"probe": script}).run()
        trials = {t.number: t for t in client.list_trials(spec.name)}
    assert [o.outcome for o in outcomes] == ["complete", "failed", "failed", "failed", "complete"]
    assert "killed by SIGKILL" in trials[1].reason
    assert "killed by SIGSEGV" in trials[2].reason
    # Killing the host costs the trial that did it; the next trial gets a new host.
    assert trials[3].state == pb.TRIAL_STATE_FAILED
    first, last = trials[0].metrics, trials[4].metrics
    assert first["preloaded"] == last["preloaded"] == 1.0  # forked warm, not started cold
    # accelerate imports DeepSpeed in every trial where it is installed: the host has it
    # already where torch has no GPU backend it could probe before forking (this machine).
    import torch

    if torch.version.cuda is None and torch.version.hip is None:
        assert first["deepspeed_preloaded"] == 1.0
    assert last["host_pid"] != first["host_pid"]
    assert last["host_pid"] != os.getpid()
    # Nothing of trial 0's mess reached trial 4: not its environment, globals, torch
    # settings, nor its memory (300 MiB, gone with its process; the host never held it).
    assert last["leaked_env"] == last["leaked_global"] == last["leaked_dtype"] == 0.0
    assert abs(last["host_rss_mb"] - first["host_rss_mb"]) < 100


def test_warm_and_cold_trials_train_the_same_model(
    sqlite_server: StagetuneServer, lora_spec: StudySpec, tmp_path: Path
) -> None:
    """Same params and seed: the same eval loss bit for bit, whichever way the trial
    started; both report their fixed start and finish costs."""
    base = tiny_spec(lora_spec, tmp_path, trials=1)
    base = dataclasses.replace(base, sampler=SamplerConfig(kind="random", seed=5))
    results = {}
    with StudyClient(sqlite_server.address) as client:
        for mode in ("warm", "cold"):
            spec = dataclasses.replace(base, name=f"lora-{mode}")
            client.create_study(spec)
            w = _worker(sqlite_server, tmp_path / mode, spec.name, cold=mode == "cold")
            (outcome,) = w.run()
            assert outcome.outcome == "complete", outcome.detail
            assert outcome.start_seconds is not None and outcome.start_seconds > 0
            assert outcome.finish_seconds is not None and outcome.finish_seconds > 0
            (trial,) = client.list_trials(spec.name)
            results[mode] = trial
            log = tmp_path / mode / "work" / spec.name / f"trial-{trial.trial_id}" / "trial.log"
            assert log.read_text(), "the trial's output reaches its log"
    assert dict(results["warm"].params) == dict(results["cold"].params)
    assert results["warm"].metrics["eval_loss"] == results["cold"].metrics["eval_loss"]


def test_each_rank_gets_what_accelerate_launch_would_give_it() -> None:
    from stagetune.trainer.trial_launch import launch_command

    env = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "")}
    (one,) = rank_environments(launch_command(Path("a.json"), 1, cpu=True), env)
    assert one["ACCELERATE_USE_CPU"] == "True" and one["OMP_NUM_THREADS"] == "1"
    assert "RANK" not in one  # run_trial gives a one-process trial its rendezvous
    two = rank_environments(launch_command(Path("a.json"), 2, cpu=True), env)
    assert [e["RANK"] for e in two] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in two} == {"2"}
    assert two[0]["MASTER_PORT"] == two[1]["MASTER_PORT"] != ""
