"""The metrics a trial can report, each with the direction that makes it better.

A study names its objectives and constraints by these names; the server maps a trial's
reported metrics to objective vectors with the directions below, and the trainer reports
values in the units below. Adding a metric here is the only step needed to make it usable
as an objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["minimize", "maximize"]


@dataclass(frozen=True)
class MetricDef:
    """One reportable metric: its name, which way is better, its unit, and what it measures."""

    name: str
    direction: Direction
    unit: str
    description: str


def _defs(*defs: MetricDef) -> dict[str, MetricDef]:
    return {d.name: d for d in defs}


METRICS: dict[str, MetricDef] = _defs(
    MetricDef("eval_loss", "minimize", "nats/token", "Mean token cross-entropy on held-out data."),
    MetricDef("perplexity", "minimize", "", "exp(eval_loss) on held-out data."),
    MetricDef(
        "exact_match",
        "maximize",
        "fraction",
        "Fraction (0..1) of held-out prompts whose generated answer matches the reference.",
    ),
    MetricDef(
        "decode_latency_ms",
        "minimize",
        "ms/token",
        "Greedy decode milliseconds per generated token after the first, batch size 1, "
        "on the fixed prompt set (objectives.measure.FIXED_PROMPTS).",
    ),
    MetricDef(
        "ttft_ms",
        "minimize",
        "ms",
        "Time to first token: prefill plus one decode step, batch size 1, fixed prompt set.",
    ),
    MetricDef(
        "peak_memory_mb",
        "minimize",
        "MiB",
        "Peak training memory: CUDA allocator peak on GPU, process peak RSS on CPU.",
    ),
    MetricDef(
        "inference_memory_mb",
        "minimize",
        "MiB",
        "Peak memory while decoding the fixed prompt set with the trained model.",
    ),
    MetricDef(
        "device_seconds",
        "minimize",
        "s",
        "Cost of the trial: wall-clock seconds multiplied by the number of devices used.",
    ),
    MetricDef(
        "tokens_per_second",
        "maximize",
        "tokens/s",
        "Training throughput: tokens processed per wall-clock second, all devices together.",
    ),
    MetricDef(
        "parameters_m",
        "minimize",
        "M",
        "Size of the trained model in millions of parameters (the proxy's width x depth).",
    ),
    MetricDef(
        "reward_accuracy",
        "maximize",
        "fraction",
        "Preference stages: fraction of held-out pairs where the chosen reward beats "
        "the rejected one.",
    ),
    MetricDef(
        "reward_margin",
        "maximize",
        "nats",
        "Preference stages: mean (chosen reward - rejected reward) on held-out pairs.",
    ),
    MetricDef(
        "mean_reward",
        "maximize",
        "",
        "RL stages: mean reward-function score on held-out prompts.",
    ),
)


def metric(name: str) -> MetricDef:
    """Return the definition of metric `name`.

    Raises:
        KeyError: `name` is not in `METRICS`; the message lists the known names.
    """
    try:
        return METRICS[name]
    except KeyError:
        known = ", ".join(sorted(METRICS))
        raise KeyError(f"unknown metric {name!r}; known metrics: {known}") from None
