"""GPU placement: workers on one node share out its devices without overlap.

There is no GPU here, so the node's devices are a fake list given the way a scheduler
gives it (``CUDA_VISIBLE_DEVICES``); the claiming, the locks and the trial environment are
the real code, in real separate processes. On a lent GPU machine the same code reads the
devices from ``nvidia-smi``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stagetune.contract.errors import InvalidArgument
from stagetune.trainer.devices import GpuRequest, claim_devices, parse_gpus, visible_devices
from stagetune.trainer.worker import Worker, WorkerSettings

CLAIMER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from stagetune.contract.errors import InvalidArgument
    from stagetune.trainer.devices import claim_devices, parse_gpus, visible_devices
    try:
        claim = claim_devices(parse_gpus(sys.argv[1]), visible_devices(), Path(sys.argv[2]))
    except InvalidArgument as e:
        print("refused:", e.message, flush=True)
        sys.exit(2)
    print("claimed:", claim.cuda_visible_devices, flush=True)
    sys.stdin.read()  # hold the devices until the test closes stdin (or kills us)
    """
)


def claimer(gpus: str, lock_dir: Path, visible: str = "0,1,2,3") -> subprocess.Popen[str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible)
    return subprocess.Popen(
        [sys.executable, "-c", CLAIMER, gpus, str(lock_dir)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def test_gpus_is_a_count_or_device_ids() -> None:
    assert parse_gpus("0") == GpuRequest(count=0)
    assert parse_gpus(2) == GpuRequest(count=2)
    assert parse_gpus("0,1") == GpuRequest(ids=("0", "1"))
    assert parse_gpus("3,") == GpuRequest(ids=("3",))
    for bad in ("many", "0,0", "a,b", "-1"):
        with pytest.raises(InvalidArgument) as err:
            parse_gpus(bad)
        assert err.value.field == "--gpus"


def test_the_devices_are_those_the_scheduler_made_visible() -> None:
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_workers_on_one_node_never_share_a_device(tmp_path: Path) -> None:
    first, second = claimer("2", tmp_path), claimer("2", tmp_path)
    try:
        a, b = first_line(first), first_line(second)
        assert a.startswith("claimed:") and b.startswith("claimed:")
        got_a, got_b = set(a.split()[1].split(",")), set(b.split()[1].split(","))
        assert len(got_a) == len(got_b) == 2 and not got_a & got_b
        third = claimer("1", tmp_path)
        assert first_line(third).startswith("refused: --gpus: 1 asked for, only 0 of 4 free")
        assert third.wait(timeout=30) == 2
        # A worker killed outright frees its devices: the kernel drops its locks.
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        fourth = claimer("2", tmp_path)
        assert set(first_line(fourth).split()[1].split(",")) == got_a
        fourth.communicate("", timeout=30)
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.communicate("", timeout=30)


def test_named_devices_in_use_elsewhere_are_refused_and_nothing_is_held(tmp_path: Path) -> None:
    holder = claimer("1,", tmp_path)
    try:
        assert first_line(holder) == "claimed: 1"
        with pytest.raises(InvalidArgument, match="device 1 is in use by another worker"):
            claim_devices(parse_gpus("0,1"), ["0", "1", "2"], tmp_path)
        # Device 0 was locked on the way and released when 1 was found taken.
        claim = claim_devices(parse_gpus("0,"), ["0", "1", "2"], tmp_path)
        assert claim.devices == ("0",)
        claim.release()
    finally:
        holder.communicate("", timeout=30)


def test_a_trial_sees_only_its_workers_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    lock_dir = tmp_path / "locks"
    # No server is contacted: gRPC channels connect on the first call.
    one = Worker(WorkerSettings(server="127.0.0.1:9", gpus="2", gpu_lock_dir=lock_dir))
    two = Worker(WorkerSettings(server="127.0.0.1:9", gpus="2,3", gpu_lock_dir=lock_dir))
    cpu = Worker(WorkerSettings(server="127.0.0.1:9", gpu_lock_dir=lock_dir))
    assert one.trial_environment()["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert two.trial_environment()["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert cpu.trial_environment()["CUDA_VISIBLE_DEVICES"] == ""  # every GPU hidden
    with pytest.raises(InvalidArgument, match="--gpus"):
        Worker(WorkerSettings(server="127.0.0.1:9", gpus="1", gpu_lock_dir=lock_dir))
    for w in (one, two, cpu):
        w.devices.release()


def test_the_cli_refuses_a_bad_gpus_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stagetune.cli", "worker", "--gpus", "0,0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--gpus" in result.stderr and "Traceback" not in result.stderr
