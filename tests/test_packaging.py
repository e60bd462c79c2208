"""The package as a team installs it: a wheel built from this checkout, installed into fresh
virtual environments outside it, used from empty folders. Nothing here imports the
checkout's code; every step is the installed ``stagetune`` command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

#: The folders that hold parts of the ``stagetune`` namespace (their ``stagetune/`` subfolder).
NAMESPACE_FOLDERS = ("proto", "server", "trainer", "objectives")


def run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STAGETUNE_", "PYTHON"))}
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(out)], out)
    (built,) = out.glob("stagetune-*.whl")
    return built


def fresh_venv(where: Path, *requirements: str) -> Path:
    """A new venv at ``where`` with ``requirements`` installed; its bin folder."""
    run([sys.executable, "-m", "venv", str(where)], where.parent)
    pip = [str(where / "bin" / "python"), "-m", "pip", "install", "-q"]
    run([*pip, *requirements], where.parent)
    return where / "bin"


def torch_requirement() -> str:
    """The torch this checkout's venv uses (``make setup`` picks it: a CPU build here);
    left to pip, plain ``torch`` is a several-GB CUDA build."""
    import torch

    return os.environ.get("TORCH") or f"torch=={torch.__version__.split('+')[0]}"


def serve(bin_dir: Path, data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """``stagetune serve --port 0`` from ``bin_dir``; the process and its address."""
    proc = subprocess.Popen(
        [str(bin_dir / "stagetune"), "serve", "--port", "0", "--data-dir", str(data_dir)],
        cwd=data_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if m := re.search(r"stagetune serving on (\S+)", line):
            return proc, m.group(1)
    raise AssertionError(f"no serving banner: {''.join(seen)}")


@pytest.fixture
def stop_after() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.terminate()
        p.wait(timeout=30)


def test_the_wheel_holds_every_module_and_config_under_stagetune_alone(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"stagetune", wheel.name.split("-py3")[0] + ".dist-info"}
    expected = {
        str(p.relative_to(REPO / folder))
        for folder in NAMESPACE_FOLDERS
        for p in (REPO / folder / "stagetune").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    expected |= {
        "stagetune/configs/" + str(p.relative_to(REPO / "configs"))
        for p in (REPO / "configs").rglob("*")
        if p.suffix in {".yaml", ".json"}
    }
    assert expected - set(names) == set()


def test_the_server_extra_serves_and_answers_health_without_torch(
    wheel: Path, tmp_path: Path, stop_after: list[subprocess.Popen[str]]
) -> None:
    bin_dir = fresh_venv(tmp_path / "venv", f"{wheel}[server]")
    no_torch = subprocess.run(
        [str(bin_dir / "python"), "-c", "import torch"], capture_output=True, text=True
    )
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc, address = serve(bin_dir, empty / "data")
    stop_after.append(proc)
    health = run([str(bin_dir / "stagetune"), "health", "--server", address], empty)
    assert "SERVING" in health.stdout
    proc.terminate()
    proc.wait(timeout=30)
    down = subprocess.run(
        [str(bin_dir / "stagetune"), "health", "--server", address, "--timeout", "2"],
        capture_output=True,
        text=True,
    )
    assert down.returncode == 1 and "NOT SERVING" in down.stdout


def test_the_base_install_lists_and_copies_the_packaged_configs(
    wheel: Path, tmp_path: Path
) -> None:
    bin_dir = fresh_venv(tmp_path / "venv", str(wheel))
    empty = tmp_path / "empty"
    empty.mkdir()
    listed = run([str(bin_dir / "stagetune"), "configs"], empty).stdout.split()
    assert listed == ["dpo", "grpo", "lora", "pretrain_proxy", "sft"]
    run([str(bin_dir / "stagetune"), "configs", "lora", "mine.yaml"], empty)
    assert (empty / "mine.yaml").read_text() == (REPO / "configs" / "lora.yaml").read_text()


def test_the_all_extra_runs_the_demo_with_zero2_and_warm_start_in_an_empty_folder(
    wheel: Path, tmp_path: Path, stop_after: list[subprocess.Popen[str]]
) -> None:
    bin_dir = fresh_venv(tmp_path / "venv", torch_requirement())
    run([str(bin_dir / "pip"), "install", "-q", f"{wheel}[all]"], tmp_path)
    # DeepSpeed's setup imports torch, so it builds against the torch already installed.
    run(
        [str(bin_dir / "pip"), "install", "-q", "--no-build-isolation", "deepspeed>=0.16"], tmp_path
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    stagetune = str(bin_dir / "stagetune")
    run([stagetune, "configs", "lora", "study.yaml"], empty)
    spec = yaml.safe_load((empty / "study.yaml").read_text())
    spec["runner"]["training"]["zero_stage"] = 2  # the packaged DeepSpeed JSON
    spec["warm_start"] = {"defaults": True}  # the packaged warm-start defaults
    spec["fidelity"] = {"min_steps": 2, "max_steps": 4, "reduction_factor": 2}
    (empty / "study.yaml").write_text(yaml.safe_dump(spec))

    demo = run(
        [stagetune, "demo", "--config", "study.yaml", "--trials", "2", "--workers", "1"], empty
    )
    assert "2 trials complete" in demo.stdout, demo.stdout[-3000:]
    logs = sorted((empty / "stagetune-demo" / "work").rglob("trial.log"))
    assert len(logs) == 2
    for log in logs:  # DeepSpeed really ran, from the JSON inside the installed package
        assert "DeepSpeed ZeRO-2" in log.read_text(), log.read_text()[-2000:]

    # Both trials came from the packaged lora defaults (learning_rate, lora_r, ...).
    proc, address = serve(bin_dir, empty / "stagetune-demo")
    stop_after.append(proc)
    front = json.loads(
        run(
            [stagetune, "pareto", spec["name"], "--format", "json", "--server", address], empty
        ).stdout
    )
    defaults = [(2.0e-4, 16, 32, 0.05), (1.0e-3, 8, 16, 0.05)]
    assert front["trials"]
    for t in front["trials"]:
        p = t["params"]
        assert (p["learning_rate"], p["lora_r"], p["lora_alpha"], p["lora_dropout"]) in defaults
