"""Overlap between train, eval and test: exact and near duplicates, and a verdict.

A held-out score means something only if the held-out examples were not trained on. Before
a stage starts, every later split is compared with every earlier one (eval with train, test
with train, test with eval), and each row of the later split is counted as

- an **exact duplicate** when its normalised text (lowercased, punctuation removed,
  whitespace collapsed) equals that of some row of the earlier split;
- a **near duplicate** otherwise when it shares an n-gram of words (n = 13) with some row of
  the earlier split: the contamination test of the GPT-3 paper (Brown et al. 2020,
  appendix C). A row shorter than n words can only be an exact duplicate.

A pair's overlap fraction is (exact + near) / rows of the later split. ``check_overlap``
refuses (``OverlapRefused``, a ``FailedPrecondition``) when any pair's fraction is above
``max_fraction``, naming every pair above it with its counts. ``without_overlap`` instead
drops the overlapping rows from the later splits (the GPT-3 paper's "clean" subsets).

Measured on the shared data with the default 80/10/10 content-hash split (keyed on every
field): GSM8K has no exact duplicates across splits but about 1.1% of eval and test rows share
a 13-gram with train (rephrased variants of one problem); hh-rlhf about 9.5%, from dialogues
that open with the same human turn (keying its split on that turn leaves 1 row in 481).

Pure Python over strings; n-grams are kept as Python hashes of word tuples (a false match
needs a 64-bit hash collision). On 7,473 GSM8K rows this takes about a second on one core.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stagetune.contract.errors import FailedPrecondition

__all__ = [
    "DEFAULT_MAX_FRACTION",
    "DEFAULT_NGRAM",
    "OverlapRefused",
    "OverlapReport",
    "PairOverlap",
    "check_overlap",
    "measure_overlap",
    "normalise_text",
    "row_text",
    "without_overlap",
]

T = TypeVar("T")

DEFAULT_NGRAM = 13
# Real data passes (GSM8K ~1.3%, hh-rlhf keyed by its opening turn 0-0.4%); a split key that
# keeps no related examples together does not (hh-rlhf row by row ~7-9.5%). A trial's limit
# is ``runner.data.max_overlap``, whose default is this value.
DEFAULT_MAX_FRACTION = 0.02

# Everything that is neither a word character nor whitespace, and "_" (a word character to
# `\w`): string.punctuation and its Unicode kin, symbols included.
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def normalise_text(text: str) -> str:
    """Lowercased (casefolded, NFKC), punctuation removed, whitespace collapsed to one space."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCTUATION.sub("", folded).split())


def row_text(row: Mapping[str, Any], fields: Sequence[str] | None = None) -> str:
    """The text a row is compared by: its ``fields`` (all, in row order, when None), one a line."""
    keys = list(row) if fields is None else list(fields)
    return "\n".join("" if row.get(k) is None else str(row[k]) for k in keys)


@dataclass(frozen=True)
class PairOverlap:
    """How much of ``held_out`` (the later split) already occurs in ``reference``."""

    reference: str
    held_out: str
    held_out_rows: int
    exact: int  # rows of held_out whose normalised text is that of a reference row
    near: int  # other rows of held_out sharing an n-gram with a reference row
    positions: tuple[int, ...] = field(default=(), repr=False)  # those rows, in held_out

    @property
    def overlapping(self) -> int:
        return self.exact + self.near

    @property
    def fraction(self) -> float:
        return self.overlapping / self.held_out_rows if self.held_out_rows else 0.0

    def describe(self, ngram: int = DEFAULT_NGRAM) -> str:
        return (
            f"{self.held_out} vs {self.reference}: {self.overlapping} of {self.held_out_rows} "
            f"rows ({self.fraction:.2%}) overlap ({self.exact} exact duplicates, {self.near} "
            f"more sharing a {ngram}-gram)"
        )


@dataclass(frozen=True)
class OverlapReport:
    """Every pair of splits, earlier split as reference; what ``status`` and MLflow show."""

    ngram: int
    sizes: dict[str, int]
    pairs: tuple[PairOverlap, ...]
    seconds: float

    def exceeding(self, max_fraction: float) -> list[PairOverlap]:
        """The pairs whose overlap fraction is above ``max_fraction``."""
        return [p for p in self.pairs if p.fraction > max_fraction]

    def overlapping_positions(self) -> dict[str, set[int]]:
        """Split -> positions of its rows that overlap some earlier split."""
        out: dict[str, set[int]] = {name: set() for name in self.sizes}
        for p in self.pairs:
            out[p.held_out].update(p.positions)
        return out

    def summary(self) -> str:
        return "; ".join(p.describe(self.ngram) for p in self.pairs) or "fewer than two splits"

    def as_metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow: ``overlap.eval_vs_train.exact`` and the like."""
        out: dict[str, float] = {}
        for p in self.pairs:
            prefix = f"overlap.{p.held_out}_vs_{p.reference}"
            out[f"{prefix}.exact"] = p.exact
            out[f"{prefix}.near"] = p.near
            out[f"{prefix}.fraction"] = p.fraction
        return out


class OverlapRefused(FailedPrecondition):
    """A stage's splits overlap above the allowed fraction; ``report`` holds the counts.
    ``setting`` names where the limit was configured (``runner.data.max_overlap``)."""

    def __init__(
        self, report: OverlapReport, max_fraction: float, setting: str = "overlap.max_fraction"
    ) -> None:
        worst = "; ".join(p.describe(report.ngram) for p in report.exceeding(max_fraction))
        super().__init__(f"data overlap between splits above {setting}={max_fraction:g}: {worst}")
        self.report = report
        self.max_fraction = max_fraction


@dataclass
class _Indexed:
    exact: set[str]
    grams: set[int]
    row_exact: list[str]
    row_grams: list[set[int]]


def _index(texts: Iterable[str], n: int) -> _Indexed:
    row_exact: list[str] = []
    row_grams: list[set[int]] = []
    for text in texts:
        normal = normalise_text(text)
        words = normal.split()
        row_exact.append(normal)
        row_grams.append({hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)})
    return _Indexed(set(row_exact), set().union(*row_grams), row_exact, row_grams)


def _pair(reference: str, held_out: str, ref: _Indexed, held: _Indexed) -> PairOverlap:
    exact = near = 0
    positions: list[int] = []
    for i, (normal, grams) in enumerate(zip(held.row_exact, held.row_grams, strict=True)):
        if normal in ref.exact:
            exact += 1
        elif not grams.isdisjoint(ref.grams):
            near += 1
        else:
            continue
        positions.append(i)
    return PairOverlap(reference, held_out, len(held.row_exact), exact, near, tuple(positions))


def measure_overlap(
    splits: Mapping[str, Sequence[str]], *, ngram: int = DEFAULT_NGRAM
) -> OverlapReport:
    """Exact and n-gram overlap of every split with each split before it (mapping order:
    pass train, eval, test in that order)."""
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise ValueError(f"overlap.ngram: must be an integer >= 1, got {ngram!r}")
    started = time.perf_counter()
    names = list(splits)
    indexed = {name: _index(splits[name], ngram) for name in names}
    pairs = tuple(
        _pair(names[i], names[j], indexed[names[i]], indexed[names[j]])
        for j in range(len(names))
        for i in range(j)
    )
    sizes = {name: len(splits[name]) for name in names}
    return OverlapReport(ngram, sizes, pairs, time.perf_counter() - started)


def check_overlap(
    splits: Mapping[str, Sequence[str]],
    *,
    max_fraction: float = DEFAULT_MAX_FRACTION,
    ngram: int = DEFAULT_NGRAM,
    setting: str = "overlap.max_fraction",
) -> OverlapReport:
    """``measure_overlap``, then refuse (``OverlapRefused``) when a pair is above
    ``max_fraction``; the report otherwise. Errors name ``setting``."""
    if isinstance(max_fraction, bool) or not isinstance(max_fraction, int | float):
        raise ValueError(f"{setting}: must be a number, got {max_fraction!r}")
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"{setting}: must be between 0 and 1, got {max_fraction!r}")
    report = measure_overlap(splits, ngram=ngram)
    if report.exceeding(max_fraction):
        raise OverlapRefused(report, max_fraction, setting)
    return report


def without_overlap(splits: Mapping[str, Sequence[T]], report: OverlapReport) -> dict[str, list[T]]:
    """``splits`` with every row that ``report`` found overlapping an earlier split removed
    (the first split is kept whole). ``report`` must have been measured on ``splits``."""
    if report.sizes != {name: len(rows) for name, rows in splits.items()}:
        raise ValueError("overlap: the report was measured on other splits")
    dropped = report.overlapping_positions()
    return {
        name: [row for i, row in enumerate(rows) if i not in dropped[name]]
        for name, rows in splits.items()
    }
