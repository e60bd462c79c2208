"""The worker: polls the server, runs each trial in its own process group, reports back.

This loop imports no torch. Each trial runs in processes of its own, forked from the warm
trial host (``warm_host``: the training stack imported once) or, with ``--cold``, started
with ``accelerate launch``; on N processes either way. Every rank reads the same assignment
file, rank 0 reports rungs to the server itself, and writes a result file the worker turns
into CompleteTrial or FailTrial. A
crashed or OOM-killed trial is reported failed with its reason and the worker polls again.
SIGTERM/SIGINT: the running trial is stopped and handed back (requeued), then the loop ends.

A ``custom`` trial runs a team's own script, the file its operator allowed under the name
the study gives (``--allow-script NAME=PATH``), in the same way: its own process group
(``stagetune.trainer.custom_trial`` under ``accelerate launch``), the same lease, hand-back
and out-of-memory handling. A trial naming a script this worker does not allow is handed
back at once, with a reason that says so, for a worker that has it.

It runs past 400 lines on purpose: polling, launching, supervising (lease, signals) and
reporting one trial are one state machine; its pure parts live in ``trial_launch`` and
``devices``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from stagetune.contract.client import (
    DEFAULT_ADDRESS,
    TLS_CA_ENV,
    TLS_CERT_ENV,
    TLS_KEY_ENV,
    TOKEN_ENV,
    StudyClient,
    WorkerClient,
)
from stagetune.contract.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StagetuneError,
    Unavailable,
)
from stagetune.contract.spec import spec_from_proto
from stagetune.contract.stages import CUSTOM
from stagetune.trainer.allowed_scripts import ALLOW_FLAG, check_allowed_scripts, refusal
from stagetune.trainer.assignment import Assignment, TrialResult, trial_seed
from stagetune.trainer.custom_trial import ASSIGNMENT_ENV
from stagetune.trainer.devices import DEFAULT_LOCK_DIR, claim_devices, parse_gpus, visible_devices
from stagetune.trainer.trial_launch import (
    failure_reason,
    launch_command,
    log_tail,
    trial_folder,
    uses_deepspeed,
)
from stagetune.trainer.warm_host import ColdTrial, TrialProcess, WarmHost
from stagetune.v1 import types_pb2 as pb
from stagetune.v1 import worker_service_pb2 as ws

__all__ = [
    "WorkerSettings",
    "Worker",
    "TrialOutcome",
]

Outcome = Literal["complete", "stopped", "failed", "interrupted", "lost"]


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class WorkerSettings:
    server: str = DEFAULT_ADDRESS
    worker_id: str = field(default_factory=_default_worker_id)
    study_name: str = ""  # only this study; the worker exits when it is done or stopped
    max_trials: int | None = None  # exit after running this many trials
    processes: int = 1  # accelerate processes per trial
    # Start each trial with ``accelerate launch`` (a new interpreter importing everything)
    # instead of forking it from the warm trial host.
    cold: bool = False
    # GPUs for this worker's trials: a count ("2": any two free devices of the node), device
    # ids ("0,1"), or 0 (CPU). Claimed for the worker's life, never shared (see devices).
    gpus: int | str = 0
    gpu_lock_dir: Path = DEFAULT_LOCK_DIR
    threads_per_trial: int | None = None  # OMP/torch threads per trial process
    work_dir: Path = field(default_factory=lambda: Path("stagetune-data") / "work")
    poll_interval: float = 2.0
    keep_outputs: bool = False  # keep each trial's output folder (checkpoints, adapters)
    # Training scripts a custom study may name, by name (--allow-script NAME=PATH): the
    # operator's choice, the only code besides the built-in runners this worker runs.
    scripts: dict[str, Path] = field(default_factory=dict)
    # Credentials (None: from $STAGETUNE_TOKEN / $STAGETUNE_TLS_*). They reach the trial
    # processes through those variables; the token is never printed (not even in a repr).
    token: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def client_options(self) -> dict[str, str | None]:
        return {
            "token": self.token,
            "ca_cert": self.tls_ca,
            "client_cert": self.tls_cert,
            "client_key": self.tls_key,
        }

    def trial_env(self) -> dict[str, str]:
        """What a trial process needs to reach the server as this worker does."""
        env: dict[str, str] = {}
        if self.token:
            env[TOKEN_ENV] = self.token
        for name, value in (
            (TLS_CA_ENV, self.tls_ca),
            (TLS_CERT_ENV, self.tls_cert),
            (TLS_KEY_ENV, self.tls_key),
        ):
            if value:
                env[name] = str(Path(value).resolve())
        return env


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: int
    outcome: Outcome
    seconds: float
    detail: str = ""
    # Fixed cost of a built-in stage's trial, when it trained: from the assignment's
    # arrival to its first training step, and from the end of training to the result
    # reported to the server.
    start_seconds: float | None = None
    finish_seconds: float | None = None


class Worker:
    """One polling worker. ``run`` loops until stopped, out of work, or out of trials."""

    def __init__(self, settings: WorkerSettings, host: WarmHost | None = None) -> None:
        """``host``: a warm trial host to share (several workers of one process, one host);
        by default the worker starts its own on its first trial."""
        self.settings = settings
        self.scripts = check_allowed_scripts(settings.scripts)  # InvalidArgument: --allow-script
        # Claimed before anything else: a worker that cannot have its devices says so and
        # starts nothing (InvalidArgument naming --gpus).
        self.devices = claim_devices(
            parse_gpus(settings.gpus), visible_devices(), settings.gpu_lock_dir
        )
        self.client = WorkerClient(settings.server, **settings.client_options())
        self.studies = StudyClient(settings.server, **settings.client_options())
        self._stop = threading.Event()
        #: The signal that stopped the worker, if one did (the CLI exits 128 + it).
        self.stopped_by: int | None = None
        self._child: TrialProcess | None = None
        self._host = host
        self.outcomes: list[TrialOutcome] = []

    def stop(self) -> None:
        """Ask the loop to end; the running trial is handed back to the server."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def stop(signum: int, frame: object) -> None:
            self.stopped_by = signum
            self.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)

    def _log(self, message: str) -> None:
        print(f"[worker {self.settings.worker_id}] {message}", flush=True)

    def run(self) -> list[TrialOutcome]:
        s = self.settings
        self._log(f"polling {s.server}" + (f" for study {s.study_name}" if s.study_name else ""))
        if self.devices.devices:
            self._log(f"trials run on GPU {self.devices.cuda_visible_devices}")
        if not s.cold:
            self.warm_host()  # it imports the training stack while the worker polls
        try:
            self._check_study_fits()
            while not self._stop.is_set():
                if s.max_trials is not None and len(self.outcomes) >= s.max_trials:
                    self._log(f"ran {len(self.outcomes)} trials; exiting")
                    break
                try:
                    got = self.client.acquire(
                        s.worker_id,
                        study_name=s.study_name,
                        hostname=socket.gethostname(),
                        gpus=len(self.devices.devices),
                        processes=s.processes,
                        scripts=self.scripts,
                    )
                except Unavailable as e:
                    self._log(f"server unavailable ({e.message}); retrying")
                    self._stop.wait(s.poll_interval)
                    continue
                if isinstance(got, ws.NoTrial):
                    if s.study_name and self._study_finished(got):
                        self._log(f"study {s.study_name} is finished; exiting")
                        break
                    wait = got.retry_after.ToTimedelta().total_seconds() or s.poll_interval
                    self._stop.wait(min(wait, 30.0))
                    continue
                self.outcomes.append(self.run_trial(got, received=time.time()))
        finally:
            self.client.close()
            self.studies.close()
            self.devices.release()
        return self.outcomes

    def _check_study_fits(self) -> None:
        """A worker for one custom study whose script its operator did not allow could never
        get a trial (the server hands it none): say so and end, rather than poll forever."""
        if not self.settings.study_name:
            return
        try:
            spec = spec_from_proto(self.studies.get_study(self.settings.study_name).spec)
        except (PermissionDenied, NotFound, Unavailable):
            return  # a worker token may not read studies; a missing study is found below
        script = str(spec.runner.get("script", ""))
        if spec.stage == "custom" and script not in self.scripts:
            raise InvalidArgument(
                ALLOW_FLAG, refusal(self.settings.worker_id, script, self.scripts)
            )

    def _study_finished(self, no_trial: ws.NoTrial) -> bool:
        try:
            study = self.studies.get_study(self.settings.study_name)
        except NotFound:
            # Never created (a worker started before its study was submitted): a
            # configuration error, not a finished study, so a Job does not count it done.
            raise
        except PermissionDenied:
            # A worker token may not read studies: the server's answer names the state.
            return no_trial.reason.endswith(("(done)", "(stopped)"))
        return study.state in (pb.STUDY_STATE_DONE, pb.STUDY_STATE_STOPPED)

    # ------------------------------------------------------------ one trial

    def _write_assignment(self, got: ws.Assignment, trial_dir: Path) -> Assignment:
        spec = spec_from_proto(got.spec)
        assignment = Assignment.of_trial(
            spec,
            got.trial,
            list(got.rung_steps),
            trial_dir,
            seed=trial_seed(spec.sampler.seed, got.trial.number),
            server=self.settings.server,
            worker_id=self.settings.worker_id,
        )
        assignment.write(trial_dir / "assignment.json")
        return assignment

    def trial_environment(self) -> dict[str, str]:
        """The environment a trial process starts with: offline hubs, the worker's
        credentials, its thread count, and only its own GPUs."""
        s = self.settings
        env = dict(os.environ)
        env.update(
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
        )
        env.update(s.trial_env())
        if s.threads_per_trial:
            env["OMP_NUM_THREADS"] = str(s.threads_per_trial)
        # Only this worker's devices; "" for a CPU worker, whose trials never touch a GPU.
        env["CUDA_VISIBLE_DEVICES"] = self.devices.cuda_visible_devices
        return env

    def warm_host(self) -> WarmHost:
        """The warm trial host, started on first use (it imports the training stack)."""
        if self._host is None:
            self._host = WarmHost(self.trial_environment())
        return self._host

    def run_trial(self, got: ws.Assignment, received: float | None = None) -> TrialOutcome:
        s = self.settings
        trial = got.trial
        started = time.monotonic()
        received = time.time() if received is None else received
        trial_dir = trial_folder(s.work_dir, trial.study_name, trial.trial_id)
        if trial_dir is None:  # never rmtree or write outside the work folder
            why = f"study name {trial.study_name!r} is not a plain folder name; refused"
            self._log(f"trial {trial.trial_id}: {why}")
            self.client.fail(trial.trial_id, s.worker_id, "crash", why)
            return TrialOutcome(trial.trial_id, "failed", time.monotonic() - started, why)
        shutil.rmtree(trial_dir, ignore_errors=True)
        trial_dir.mkdir(parents=True)
        assignment = self._write_assignment(got, trial_dir)
        script: Path | None = None
        if assignment.stage == CUSTOM.name:
            name = str(assignment.runner.get("script", ""))
            script = self.scripts.get(name)
            if script is None:
                return self._refuse(trial.trial_id, refusal(s.worker_id, name, self.scripts))
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in sorted(assignment.params.items())
        )
        self._log(
            f"trial {trial.trial_id} ({trial.study_name} #{trial.number}, "
            f"attempt {trial.attempt}): {params}"
        )
        env = self.trial_environment()
        # Trials log the models they save to the run the server made for them (a next
        # stage loads it from there): unless this worker was told otherwise, they use the
        # tracking server the server named.
        if got.mlflow_tracking_uri and not env.get("MLFLOW_TRACKING_URI"):
            env["MLFLOW_TRACKING_URI"] = got.mlflow_tracking_uri
        env[ASSIGNMENT_ENV] = str((trial_dir / "assignment.json").resolve())
        log_path = trial_dir / "trial.log"
        cmd = launch_command(
            trial_dir / "assignment.json",
            int(assignment.runner.get("processes", s.processes)),  # the study's, if it says
            cpu=not self.devices.devices,
            deepspeed=uses_deepspeed(assignment),
            script=script,
        )
        if s.cold:
            self._child = ColdTrial(cmd, env, log_path)
        else:
            self._child = self.warm_host().launch(cmd, env, log_path)
        outcome = self._supervise(trial.trial_id, got.lease_duration.ToTimedelta().total_seconds())
        code = self._child.wait()
        _end_group(self._child.pid)  # what the trial left behind (its ranks' helpers)
        self._child = None
        timing: dict[str, float] = {}
        if outcome is None:
            path = Path(assignment.result_path)
            written = TrialResult.read(path) if path.exists() else None
            outcome = self._report(assignment, code, log_path, written)
            # when training began and ended (wall clock), if the trial says
            if (
                outcome[0] == "complete"
                and written is not None
                and {"first_step", "train_end"} <= written.timing.keys()
            ):
                timing = written.timing
        sent = time.time()
        result = TrialOutcome(
            trial.trial_id,
            outcome[0],
            time.monotonic() - started,
            outcome[1],
            start_seconds=timing["first_step"] - received if timing else None,
            finish_seconds=sent - timing["train_end"] if timing else None,
        )
        fixed = (
            f"; start {result.start_seconds:.2f}s, finish {result.finish_seconds:.2f}s"
            if timing
            else ""
        )
        self._log(
            f"trial {trial.trial_id}: {result.outcome} in {result.seconds:.1f}s"
            + (f" ({result.detail}{fixed})" if result.detail else "")
        )
        self._tidy_outputs(assignment, trial_dir / "output")
        return result

    def _refuse(self, trial_id: int, why: str) -> TrialOutcome:
        """Hand a trial this worker cannot run back to the server (requeued within the
        study's retries, for a worker that can), then wait a poll before asking again."""
        self._log(f"trial {trial_id}: {why}")
        try:
            self.client.fail(trial_id, self.settings.worker_id, "interrupted", why)
        except FailedPrecondition as e:
            return TrialOutcome(trial_id, "lost", 0.0, e.message)
        self._stop.wait(self.settings.poll_interval)
        return TrialOutcome(trial_id, "interrupted", 0.0, why)

    def _tidy_outputs(self, a: Assignment, output: Path) -> None:
        """Drop a finished trial's scratch files; keep its saved model when the study asks
        (``runner.save_model``) so a later stage can start from it."""
        if self.settings.keep_outputs:
            return
        model = output / "model"
        if a.runner.get("save_model") and model.is_dir():
            for entry in output.iterdir():
                if entry.is_dir() and entry != model:
                    shutil.rmtree(entry)
                elif entry.is_file():
                    entry.unlink()
            self._log(f"trial {a.trial_id}: model saved in {model}")
            return
        shutil.rmtree(output, ignore_errors=True)

    def _supervise(self, trial_id: int, lease: float) -> tuple[Outcome, str] | None:
        """Wait for the trial process, renewing the lease. Returns an outcome when the
        worker had to end the trial itself (shutdown, lost lease), else None."""
        assert self._child is not None
        interval = max(1.0, min(30.0, (lease or 60.0) / 4))
        next_beat = time.monotonic() + interval
        while not self._ended(0.2):  # wakes as the trial ends, not at the next tick
            if self._stop.is_set():
                self._kill_child()
                try:
                    self.client.fail(
                        trial_id, self.settings.worker_id, "interrupted", "worker shutting down"
                    )
                except StagetuneError as e:
                    return "interrupted", f"could not hand back: {e.message}"
                return "interrupted", "handed back to the server"
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + interval
                try:
                    if self.client.heartbeat(trial_id, self.settings.worker_id):
                        self._kill_child()
                        self.client.fail(
                            trial_id, self.settings.worker_id, "interrupted", "study stopped"
                        )
                        return "interrupted", "study stopped"
                except FailedPrecondition as e:
                    # Stopped at a rung (the trial exits by itself) or reaped: never both
                    # this worker and a retry running the same attempt.
                    try:
                        self._child.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        self._kill_child()
                        return "lost", e.message
                except StagetuneError as e:
                    self._log(f"heartbeat failed: {e.message}")
        return None

    def _ended(self, timeout: float) -> bool:
        """Whether the trial process has ended, waiting up to ``timeout`` seconds."""
        assert self._child is not None
        try:
            self._child.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _kill_child(self) -> None:
        child = self._child
        if child is None or child.poll() is not None:
            return
        try:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _end_group(child.pid)
            child.wait()
        except ProcessLookupError:  # not yet in a group of its own (a trial just forked)
            os.kill(child.pid, signal.SIGKILL)
            child.wait()

    def _report(
        self, a: Assignment, code: int, log_path: Path, result: TrialResult | None
    ) -> tuple[Outcome, str]:
        """Report how the trial ended, from its exit ``code`` and the ``result`` it wrote
        (None: it wrote none)."""
        wid = self.settings.worker_id
        try:
            if result is not None and result.status == "stopped":
                return "stopped", result.reason
            if result is not None and result.status == "complete" and code == 0:
                bad = {k: v for k, v in result.metrics.items() if not math.isfinite(v)}
                if bad:
                    self.client.fail(a.trial_id, wid, "crash", f"diverged: non-finite {bad}")
                    return "failed", f"non-finite metrics {sorted(bad)}"
                missing = [m for m in a.objectives if m not in result.metrics]
                if missing:
                    self.client.fail(a.trial_id, wid, "crash", f"runner reported no {missing}")
                    return "failed", f"missing objective metrics {missing}"
                self.client.complete(a.trial_id, wid, result.metrics)
                values = ", ".join(f"{m}={result.metrics[m]:.4g}" for m in a.objectives)
                return "complete", values
            if result is not None and result.status == "out_of_memory":
                self.client.fail(a.trial_id, wid, "out_of_memory", result.reason)
                return "failed", "out of memory"
            why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if code == -signal.SIGKILL or code == 137:
                why += " (possibly out of host memory)"
            detail = result.reason if result is not None and result.reason else ""
            reason = failure_reason(why, detail, log_tail(log_path))
            self.client.fail(a.trial_id, wid, "crash", reason)
            return "failed", reason.splitlines()[0]
        except FailedPrecondition as e:
            return "lost", e.message


def _end_group(pgid: int) -> None:
    """SIGKILL whatever is left of a trial's process group (nothing, usually)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
