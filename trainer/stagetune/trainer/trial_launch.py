"""How a worker starts a trial process and reads how it ended: the trial's folder, its
``accelerate launch`` command, and a failed trial's reason (its headline names the Python
error; the end of the trial log follows). Imports no torch."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from stagetune.trainer.assignment import Assignment, free_port

__all__ = ["failure_reason", "launch_command", "log_tail", "trial_folder", "uses_deepspeed"]


def trial_folder(work_dir: Path, study_name: str, trial_id: int) -> Path | None:
    """``work_dir/<study>/trial-<id>``, or None if the study name (which comes from the
    server) would put it anywhere else: the worker deletes and writes this folder."""
    base = work_dir.resolve()
    study_dir = (base / study_name).resolve()
    if not study_name or study_dir.parent != base or study_dir.name != study_name:
        return None
    return study_dir / f"trial-{trial_id}"


def launch_command(
    assignment_path: Path,
    processes: int,
    cpu: bool,
    deepspeed: bool = False,
    script: Path | None = None,
) -> list[str]:
    """The ``accelerate launch`` command that starts one trial on ``processes`` ranks: the
    stage's runner, or with ``script`` a custom trial running that (allowed) script."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        # accelerate's --cpu always starts one process; its torchrun launcher starts N, and
        # on CPU the trainer (use_cpu) joins them with gloo.
        cmd.append("--multi_gpu")
    elif cpu and not deepspeed:
        # --cpu would silently switch DeepSpeed off; a DeepSpeed trial on CPU relies on the
        # hidden GPUs (CUDA_VISIBLE_DEVICES="") and the trainer's use_cpu instead.
        cmd.append("--cpu")
    if processes > 1:
        cmd += ["--main_process_port", str(free_port())]
    if script is not None:
        entry = ["stagetune.trainer.custom_trial", str(assignment_path), "--script", str(script)]
        return [*cmd, "-m", *entry]
    return [*cmd, "-m", "stagetune.trainer.run_trial", str(assignment_path)]


def uses_deepspeed(a: Assignment) -> bool:
    """Whether this trial trains under DeepSpeed (a ZeRO stage or a config of its own)."""
    settings = {**a.runner.get("training", {}), **a.params}
    return bool(settings.get("deepspeed_config")) or int(settings.get("zero_stage", 0)) > 0


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


#: The last line of a Python traceback: ``ValueError: ...``, ``torch.OutOfMemoryError: ...``.
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)):\s?(.*)$")
#: What the server keeps of a reason (the client sends at most this much).
_REASON_CHARS = 4000


def _error_line(text: str) -> str:
    """The last ``Type: message`` line of a traceback in ``text`` ("" if none)."""
    for line in reversed(text.splitlines()):
        if _ERROR_LINE.match(line.strip()):
            return line.strip()
    return ""


def failure_reason(why: str, detail: str, log_tail: str) -> str:
    """A failed trial's reason: one headline naming how it ended and the Python error
    (``exit code 1: ValueError: runner.data.path: ...``), then the error's details and the
    end of the trial log, cut from the middle so the headline always survives."""
    error = _error_line(detail) or _error_line(log_tail)
    headline = f"{why}: {error}" if error else why
    headline = headline[:1000]
    body = "\n".join(part for part in (detail, "--- trial log (end) ---\n" + log_tail) if part)
    room = _REASON_CHARS - len(headline) - 1
    return f"{headline}\n{body[-room:]}" if room > 0 else headline
