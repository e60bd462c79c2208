"""``stagetune pipeline``: submit a pipeline, follow it, approve a manual stage, stop it.

::

    stagetune pipeline submit configs/pipelines/tiny-lifecycle.yaml   # or a packaged name
    stagetune pipeline status tiny-lifecycle     # stages, selections, models, costs, test
    stagetune pipeline approve tiny-lifecycle --trial 42
    stagetune pipeline stop tiny-lifecycle

Registered by ``stagetune.cli.main``; errors print one line there (exit status 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from stagetune.contract.pipeline_client import PipelineClient
from stagetune.contract.spec import value_from_proto
from stagetune.contract.stages import STAGE_NAMES
from stagetune.v1 import pipeline_service_pb2 as ps

__all__ = ["add_pipeline_parser", "render_pipeline", "render_pipelines"]

_STATE = {v: k.removeprefix("PIPELINE_STATE_").lower() for k, v in ps.PipelineState.items()}
_PHASE = {v: k.removeprefix("STAGE_PHASE_").lower() for k, v in ps.StagePhase.items()}
_RULE = {v: k.removeprefix("SELECTION_RULE_").lower() for k, v in ps.SelectionRule.items()}


def _client(args: argparse.Namespace) -> PipelineClient:
    return PipelineClient(
        args.server,
        token=args.token,
        ca_cert=args.tls_ca,
        client_cert=args.tls_cert,
        client_key=args.tls_key,
    )


def _table(headers: list[str], rows: list[list[str]]) -> str:
    cells = [headers, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _label(text: str) -> str:
    return text.replace("_", " ")


def _select(stage: ps.PipelineStageSpec) -> str:
    rule = _RULE.get(stage.select.rule, "?")
    if rule != "best":
        return rule
    limits = []
    for c in stage.select.limits:
        if c.HasField("min"):
            limits.append(f"{c.metric} >= {c.min:g}")
        if c.HasField("max"):
            limits.append(f"{c.metric} <= {c.max:g}")
    return ", ".join([f"best {stage.select.metric}", *limits])


def render_pipeline(p: ps.Pipeline) -> str:
    """Stages, the current one, selections, promoted models, costs and held-out results."""
    spec = p.spec
    current = spec.stages[p.current_stage].name if spec.stages else "?"
    head = [f"pipeline {spec.name}: {_label(_STATE.get(p.state, '?'))}"]
    if p.state in (ps.PIPELINE_STATE_RUNNING, ps.PIPELINE_STATE_AWAITING_APPROVAL):
        head[0] += f", stage {p.current_stage + 1} of {len(spec.stages)} ({current})"
    if p.reason:
        head.append(f"  {p.reason}")
    budget = (
        f" of a budget of {spec.max_device_hours * 3600:.0f} ({spec.max_device_hours:g} h)"
        if spec.HasField("max_device_hours")
        else ""
    )
    head.append(f"device-seconds: {p.device_seconds:.1f}{budget}")
    if p.mlflow_run_id:
        head.append(f"MLflow: experiment {p.mlflow_experiment_id}, run {p.mlflow_run_id}")
    rows = []
    for s, stage in zip(spec.stages, p.stages, strict=True):
        selected = str(stage.selected_trial_id) if stage.selected_trial_id else "-"
        if stage.model_trial_id and stage.model_trial_id != stage.selected_trial_id:
            selected += f" (retrain {stage.model_trial_id})"
        rows.append(
            [
                s.name,
                _label(_PHASE.get(stage.phase, "?")),
                selected,
                stage.model_uri or "-",
                f"{stage.device_seconds:.1f}",
            ]
        )
    headers = ["stage", "phase", "trial", "promoted", "device-s"]
    parts = ["\n".join(head), _table(headers, rows)]
    for s, stage in zip(spec.stages, p.stages, strict=True):
        kind = STAGE_NAMES.label(s.study.stage)
        retrain = f", retrained {s.final_steps} steps" if s.final_steps else ""
        lines = [f"{s.name} ({kind}): select {_select(s)}{retrain}"]
        if stage.base_model:
            lines.append(f"  from:    {stage.base_model}")
        studies = [
            n for n in (stage.study_name, stage.final_study_name, stage.test_study_name) if n
        ]
        if studies:
            lines.append(f"  studies: {', '.join(studies)}")
        if stage.selected_params:
            values = {k: value_from_proto(v) for k, v in sorted(stage.selected_params.items())}
            shown = (
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
            )
            lines.append(f"  params:  {', '.join(shown)}")
        if stage.reason:
            lines.append(f"  why:     {stage.reason}")
        parts.append("\n".join(lines))
    held = [
        [s.name, h.metric, f"{h.eval_value:.4g}", f"{h.test_value:.4g}", f"{h.gap:+.4g}"]
        for s, stage in zip(spec.stages, p.stages, strict=True)
        for h in stage.held_out
    ]
    if held:
        parts.append(
            "held-out results (the promoted model on eval, then once on test):\n"
            + _table(["stage", "metric", "eval", "test", "gap"], held)
        )
    return "\n\n".join(parts)


def render_pipelines(pipelines: list[ps.Pipeline]) -> str:
    if not pipelines:
        return "no pipelines"
    rows = []
    for p in pipelines:
        current = p.spec.stages[p.current_stage].name if p.spec.stages else "?"
        rows.append(
            [
                p.spec.name,
                _label(_STATE.get(p.state, "?")),
                f"{p.current_stage + 1}/{len(p.spec.stages)} {current}",
                f"{p.device_seconds:.1f}",
            ]
        )
    return _table(["pipeline", "state", "stage", "device-s"], rows)


# ------------------------------------------------------------------ commands


def cmd_submit(args: argparse.Namespace) -> int:
    from stagetune.contract.pipeline_file import check_pipeline_data, load_pipeline_file

    spec = load_pipeline_file(args.file)
    check_pipeline_data(spec)  # here, where the files are: the server never opens them
    with _client(args) as client:
        pipeline, created = client.submit(spec)
    if created:
        stages = " -> ".join(s.name for s in spec.stages)
        print(f"submitted pipeline {spec.name}: {stages}")
    else:
        print(f"pipeline {spec.name} already exists with this spec; nothing changed")
    print(render_pipeline(pipeline))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.name:
            print(render_pipeline(client.get(args.name)))
        else:
            print(render_pipelines(client.list()))
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    with _client(args) as client:
        pipeline = client.approve(args.name, args.trial)
    print(f"approved trial {args.trial}")
    print(render_pipeline(pipeline))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    with _client(args) as client:
        pipeline = client.stop(args.name)
    print(render_pipeline(pipeline))
    return 0


def add_pipeline_parser(
    sub: Any, with_server: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    """The ``pipeline`` command and its actions, on the CLI's subparsers."""
    p = sub.add_parser("pipeline", help="run a lifecycle: stages that promote models to the next")
    actions = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    a = with_server(actions.add_parser("submit", help="submit a pipeline file"))
    a.add_argument("file", help="pipeline file, or a packaged pipeline's name (tiny-lifecycle)")
    a.set_defaults(fn=cmd_submit)
    a = with_server(actions.add_parser("status", help="all pipelines, or one in detail"))
    a.add_argument("name", nargs="?")
    a.set_defaults(fn=cmd_status)
    a = with_server(actions.add_parser("approve", help="promote a trial of a manual stage"))
    a.add_argument("name")
    a.add_argument("--trial", type=int, required=True, help="the trial id to promote")
    a.set_defaults(fn=cmd_approve)
    a = with_server(actions.add_parser("stop", help="stop a pipeline and its running study"))
    a.add_argument("name")
    a.set_defaults(fn=cmd_stop)
