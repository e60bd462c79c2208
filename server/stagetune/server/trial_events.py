"""What the trial service tells an observer as it works: how long handing out and completing
a trial took, each rung decision, each lease that expired and each requeued attempt.

``TrialEvents`` does nothing; the metrics (server/metrics.py) override it. The service calls
it after the fact, outside nothing it must not hold up: an observer only counts.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["TrialEvents", "AcquireOutcome"]

AcquireOutcome = Literal["trial", "no_work", "error"]
"""How an acquire ended: a trial handed out, nothing to hand out, or an error."""


class TrialEvents:
    """Events of the trial service; each method returns at once and never raises."""

    def acquired(self, seconds: float, outcome: AcquireOutcome) -> None:
        """An ``acquire`` took ``seconds`` and ended with ``outcome``."""

    def completed(self, seconds: float) -> None:
        """A ``complete`` (first call or retry, successful or refused) took ``seconds``."""

    def rung_decided(self, stop: bool) -> None:
        """A rung report was answered continue or stop (retries of one report: once)."""

    def lease_expired(self) -> None:
        """The reaper failed an attempt whose lease ran out."""

    def requeued(self) -> None:
        """A failed attempt's params were queued again as a new attempt."""
