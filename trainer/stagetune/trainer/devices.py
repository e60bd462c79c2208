"""Which GPUs a worker's trials may use, shared out between the workers of one node.

``--gpus 2`` asks for any two of the node's visible devices, ``--gpus 0,1`` for those
two; ``--gpus 0`` (the default) runs trials on the CPU. Several workers on one node each
claim their devices by taking an exclusive ``flock`` on one lock file per device in a
node-local folder, and hold the locks for their whole life: no two live workers share a
device, and a worker that dies (even by SIGKILL) frees its devices with its last file
descriptor, so nothing stale is left to clean up. Each trial process then sees only its
worker's devices through ``CUDA_VISIBLE_DEVICES``.

The node's devices are the ones ``CUDA_VISIBLE_DEVICES`` already names (a scheduler such as
Slurm or the Kubernetes device plugin sets it), else those ``nvidia-smi`` lists. This module
imports no torch: the worker loop never does.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from stagetune.contract.errors import InvalidArgument

__all__ = ["DeviceClaim", "GpuRequest", "claim_devices", "parse_gpus", "visible_devices"]

#: Where the per-device lock files live unless a worker is told otherwise. It must be the
#: same folder for every worker of a node, and local to it (flock over NFS is not reliable).
DEFAULT_LOCK_DIR = Path(tempfile.gettempdir()) / "stagetune-gpus"


@dataclass(frozen=True)
class GpuRequest:
    """What ``--gpus`` asked for: a count of any devices, or these device ids."""

    count: int = 0
    ids: tuple[str, ...] = ()

    @property
    def wanted(self) -> int:
        return len(self.ids) if self.ids else self.count


def parse_gpus(text: str | int) -> GpuRequest:
    """``"2"`` → any two devices; ``"0,1"`` (or ``"3,"`` for one) → those ids; ``"0"`` → CPU."""
    raw = str(text).strip()
    if "," in raw:
        ids = tuple(part.strip() for part in raw.split(",") if part.strip())
        if not ids or not all(i.isdigit() for i in ids) or len(set(ids)) != len(ids):
            raise InvalidArgument("--gpus", f"{raw!r}: device ids are distinct whole numbers")
        return GpuRequest(ids=ids)
    if not raw.isdigit():
        raise InvalidArgument("--gpus", f"{raw!r}: a count (2) or device ids (0,1)")
    return GpuRequest(count=int(raw))


def visible_devices(environ: dict[str, str] | None = None) -> list[str]:
    """The node's device ids this worker may share out (see the module docstring)."""
    env = os.environ if environ is None else environ
    named = env.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [d.strip() for d in named.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@dataclass
class DeviceClaim:
    """Devices held by this worker until ``release`` (or the process ends)."""

    devices: tuple[str, ...]
    _locks: list[IO[bytes]] = field(default_factory=list, repr=False)

    @property
    def cuda_visible_devices(self) -> str:
        """The value a trial process gets: its devices, or "" (no GPU) for a CPU worker."""
        return ",".join(self.devices)

    def release(self) -> None:
        for lock in self._locks:
            lock.close()  # closing the last descriptor drops the flock
        self._locks.clear()


def _try_lock(lock_dir: Path, device: str) -> IO[bytes] | None:
    handle = (lock_dir / f"gpu-{device}.lock").open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def claim_devices(
    request: GpuRequest, visible: list[str], lock_dir: Path = DEFAULT_LOCK_DIR
) -> DeviceClaim:
    """Claim the devices ``request`` asks for among ``visible``, without overlapping any
    other live worker that uses ``lock_dir``. Raises ``InvalidArgument`` naming ``--gpus``
    when they are not there or not free, having claimed nothing."""
    if request.wanted == 0:
        return DeviceClaim(devices=())
    unknown = [i for i in request.ids if i not in visible]
    if unknown:
        raise InvalidArgument(
            "--gpus", f"device(s) {','.join(unknown)} not visible here (visible: {visible})"
        )
    if request.count > len(visible):
        raise InvalidArgument(
            "--gpus", f"{request.count} asked for, {len(visible)} visible ({visible})"
        )
    lock_dir.mkdir(parents=True, exist_ok=True)
    claim = DeviceClaim(devices=())
    chosen: list[str] = []
    for device in request.ids or tuple(visible):
        if len(chosen) == request.wanted:
            break
        handle = _try_lock(lock_dir, device)
        if handle is not None:
            claim._locks.append(handle)
            chosen.append(device)
        elif request.ids:  # these exact devices were asked for: one is someone else's
            claim.release()
            raise InvalidArgument("--gpus", f"device {device} is in use by another worker")
    if len(chosen) < request.wanted:
        claim.release()
        raise InvalidArgument(
            "--gpus",
            f"{request.wanted} asked for, only {len(chosen)} of {len(visible)} free "
            f"(the rest are held by other workers; locks in {lock_dir})",
        )
    claim.devices = tuple(chosen)
    return claim
