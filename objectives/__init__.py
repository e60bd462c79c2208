"""Objectives shared by server and trainer: metric catalog, measurements, Pareto math.

Imports nothing else of the project, and no torch at import time (see `measure`).
"""

from objectives.catalog import METRICS, Direction, MetricDef, metric
from objectives.measure import (
    FIXED_PROMPTS,
    DecodeLatency,
    DeviceClock,
    measure_decode_latency,
    peak_memory_mb,
    reset_peak_memory,
)
from objectives.pareto import (
    Points,
    crowding_distance,
    default_reference,
    dominates,
    hypervolume,
    hypervolume_contributions,
    knee_point,
    non_dominated_ranks,
)

__all__ = [
    "FIXED_PROMPTS",
    "METRICS",
    "DecodeLatency",
    "DeviceClock",
    "Direction",
    "MetricDef",
    "Points",
    "crowding_distance",
    "default_reference",
    "dominates",
    "hypervolume",
    "hypervolume_contributions",
    "knee_point",
    "measure_decode_latency",
    "metric",
    "non_dominated_ranks",
    "peak_memory_mb",
    "reset_peak_memory",
]
