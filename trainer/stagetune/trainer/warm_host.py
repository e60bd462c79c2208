"""The warm trial host: trials forked from a process that has already imported the training
stack, instead of started cold with ``accelerate launch``.

A cold trial pays for a new interpreter twice (``accelerate launch``, then the trial it
starts), each importing torch; the trial then imports transformers, trl and peft. On a CPU
that is several seconds a trial, most of a low-fidelity rung. The host is Python's own
forkserver (``multiprocessing``, start method ``forkserver``) with
``stagetune.trainer.warm_preload`` preloaded: a server process that imports the stack once
and forks a fresh child for each trial. Each trial is still its own process:

- it starts its own session (process group), so the worker ends it and anything it
  started with one ``killpg``, as it does a cold trial;
- a crash, an out-of-memory kill or a SIGKILL ends that child only; the host forked it and
  lives on (and ``multiprocessing`` starts a new one if the host itself died);
- what a trial changes (globals, environment, the default dtype, memory it leaks) dies with
  the child: the next trial forks from the untouched host;
- a trial of N ranks forks N-1 more processes in its group, each reading the same
  assignment file with its own ``RANK``; the environment each rank gets is the one
  ``accelerate launch`` would set, computed by accelerate's own functions from the same
  command line (``trial_launch.launch_command``), so warm and cold trials agree.

Imports no torch: the worker loop stays light; only the host and its children hold torch.
"""

from __future__ import annotations

import argparse
import atexit
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

__all__ = ["TrialProcess", "ColdTrial", "WarmHost", "rank_environments"]

PRELOAD = "stagetune.trainer.warm_preload"

#: The module each entry point runs in a trial (what ``launch_command`` runs with ``-m``).
ENTRY_POINTS = ("stagetune.trainer.run_trial", "stagetune.trainer.custom_trial")


class TrialProcess(Protocol):
    """A running trial as the worker supervises it (``subprocess.Popen``'s shape)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class ColdTrial:
    """A trial started with ``accelerate launch`` (``--cold``)."""

    def __init__(self, cmd: list[str], env: Mapping[str, str], log_path: Path) -> None:
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True
            )
        self.pid = self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)


class WarmTrial:
    """A trial forked from the warm host."""

    def __init__(self, process: BaseProcess) -> None:
        self.process = process
        assert process.pid is not None
        self.pid: int = process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        code = self.process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(f"trial {self.pid}", timeout or 0.0)
        return code


def _launch_args(cmd: list[str]) -> argparse.Namespace:
    """accelerate's own reading of a ``launch_command`` line (defaults filled in)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    start = cmd.index("accelerate.commands.launch") + 1
    args = launch_command_parser().parse_args(cmd[start:])
    args, _, _ = _validate_launch_command(args)
    return args


def rank_environments(cmd: list[str], env: Mapping[str, str]) -> list[dict[str, str]]:
    """The environment of each rank of the trial ``cmd`` (a ``launch_command`` line) would
    start, given the worker's ``env``: what ``accelerate launch`` sets (its simple launcher
    for one process, its multi-GPU launcher plus torchrun's rank variables for several)."""
    from accelerate.utils import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    with _environ(env):  # accelerate reads OMP_NUM_THREADS and others from it
        args = _launch_args(cmd)
        if args.num_processes <= 1:
            return [prepare_simple_launcher_cmd_env(args)[1]]
        shared = prepare_multi_gpu_env(args)
    n = int(args.num_processes)
    port = str(args.main_process_port)
    return [
        {
            **shared,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "GROUP_RANK": "0",
            "ROLE_RANK": str(rank),
            "WORLD_SIZE": str(n),
            "LOCAL_WORLD_SIZE": str(n),
            "ROLE_WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        for rank in range(n)
    ]


@contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _entry(cmd: list[str]) -> tuple[str, list[str]]:
    """The trial module and its arguments: what follows ``-m`` in a launch command."""
    at = max(i for i, part in enumerate(cmd) if part == "-m")
    module, argv = cmd[at + 1], cmd[at + 2 :]
    if module not in ENTRY_POINTS:
        raise ValueError(f"not a trial entry point: {module}")
    return module, argv


def _run_rank(module: str, argv: list[str], env: Mapping[str, str]) -> int:
    """One rank, in its forked process: its environment, its threads, then the entry."""
    import importlib

    os.environ.clear()
    os.environ.update(env)
    threads = env.get("OMP_NUM_THREADS")
    if threads:
        # torch sized its pool from the host's environment at import time; this trial's
        # thread count is the worker's.
        import torch

        torch.set_num_threads(int(threads))
    main = importlib.import_module(module).main
    try:
        return int(main(argv) or 0)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def _trial(
    module: str, argv: list[str], envs: list[dict[str, str]], log: str, grouped: Any
) -> None:
    """The forked trial (``multiprocessing`` target): a session of its own, its output in
    the trial log, rank 0 here and every other rank forked beside it."""
    os.setsid()
    grouped.set()  # the worker may now end the whole trial with one killpg
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Exit handlers are the trial's own, run as a cold process would run them at exit; the
    # host's stay with the host.
    atexit._clear()
    ranks: list[int] = []
    for env in envs[1:]:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_rank(module, argv, env)
                atexit._run_exitfuncs()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        ranks.append(pid)
    code = _run_rank(module, argv, envs[0])
    for pid in ranks:
        _, status = os.waitpid(pid, 0)
        other = os.waitstatus_to_exitcode(status)  # -N: killed by signal N
        if not code and other:
            code = other if other > 0 else 128 - other
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class WarmHost:
    """Starts trials from a forkserver that preloaded the training stack.

    ``env`` is what every trial shares (offline hubs, threads): the host starts with it, as
    some libraries read their settings once, at import.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload([PRELOAD])
        self.start()

    def start(self) -> None:
        """Start the host now (or again, if it died); it imports in the background."""
        from multiprocessing import forkserver

        with _environ(self.env):
            forkserver.ensure_running()

    def ready(self) -> None:
        """Wait until the host has imported the stack (it forks a no-op process)."""
        self.start()
        process = self._ctx.Process(target=int, name="stagetune-warm-up")
        process.start()
        process.join()

    def launch(self, cmd: list[str], env: Mapping[str, str], log_path: Path) -> WarmTrial:
        """Fork the trial ``cmd`` (a ``launch_command`` line) would start, with ``env``."""
        module, argv = _entry(cmd)
        envs = rank_environments(cmd, env)
        self.start()
        grouped = self._ctx.Event()
        process = self._ctx.Process(
            target=_trial,
            args=(module, argv, envs, str(log_path), grouped),
            name="stagetune-trial",
        )
        process.start()
        # Returned once the trial leads its own process group (as a cold trial does from
        # its first instruction), so its pid is a group to end, even on a loaded machine.
        while not grouped.wait(0.1) and process.exitcode is None:
            pass
        return WarmTrial(process)
