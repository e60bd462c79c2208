"""The server reads what a worker says it has: a GPU worker never gets a trial that needs
more GPUs (one per rank) than it has. No GPU is needed: capabilities are what the worker
sends, here sent by a real client as a GPU worker would send them."""

from __future__ import annotations

import dataclasses

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.spec import StudySpec
from stagetune.server.app import StagetuneServer
from stagetune.v1 import worker_service_pb2 as ws


def test_a_gpu_worker_gets_only_trials_its_gpus_can_hold(
    server: StagetuneServer, lora_spec: StudySpec
) -> None:
    spec = dataclasses.replace(lora_spec, runner={**lora_spec.runner, "processes": 4})
    with StudyClient(server.address) as sc, WorkerClient(server.address) as wc:
        sc.create_study(spec)
        small = wc.acquire("two-gpus", study_name=spec.name, gpus=2, processes=2)
        assert isinstance(small, ws.NoTrial)
        assert "needs 4 GPUs; this worker has 2" in small.reason
        assert sc.get_study(spec.name).counts.running == 0  # nothing was handed out
        big = wc.acquire("four-gpus", study_name=spec.name, gpus=4, processes=4)
        assert isinstance(big, ws.Assignment)
        # CPU ranks need no GPU: a CPU worker may run the 4-rank trial.
        cpu = wc.acquire("cpu", study_name=spec.name, gpus=0, processes=1)
        assert isinstance(cpu, ws.Assignment)
