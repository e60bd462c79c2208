"""Training data: a synthetic task with checkable answers, and local files, split train /
eval / test and checked for overlap before a trial trains.

Every source (the synthetic task or a JSON/JSONL/Parquet file or saved ``datasets`` folder,
``runner.data``) goes through ``prepare_splits``:

1. each row gets its split from a hash of its key fields (``splits``; ``runner.data.split``,
   default keys in ``_default_key``), so every trial of every stage sees the same split;
2. the rows become the stage's examples (prompt/completion, text, or preference triples);
3. exact and 13-gram overlap between the splits is measured (``overlap``): above
   ``runner.data.max_overlap`` the trial is refused with the counts (``OverlapRefused``),
   below it the overlapping held-out rows are dropped, so no held-out score rests on text
   the model trained on;
4. each split is ordered by its examples' keys (a uniform sample, whatever the file order)
   and cut to ``train_size`` / ``eval_size`` / ``test_size``.

Steps 1 and 3 hash the text of all three splits; that is the only way any code here touches
test rows. A trial reads examples only through ``TrialData``, which hands out train and eval
to a training trial and only the scored split to an evaluation trial (``runner.evaluate``),
refuses anything else (``SplitNotAllowed``), and records every split it materialised, with
its rows' keys, in a ledger file beside the trial's result and as ``data.<split>_rows``
metrics.

It runs a little past 400 lines: every stage's data (synthetic tasks and files) goes
through the same split, overlap and size rules here, which are kept in one place.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec import DataSource
from stagetune.trainer.overlap import OverlapReport, check_overlap, row_text, without_overlap
from stagetune.trainer.splits import (
    SPLITS,
    Split,
    SplitFractions,
    example_key,
    read_rows,
    split_of_key,
)

__all__ = [
    "ExampleKind",
    "Mode",
    "STAGE_EXAMPLES",
    "PreparedSplits",
    "SplitNotAllowed",
    "TrialData",
    "prepare_splits",
    "synthetic_sft",
    "synthetic_preferences",
    "split_shared_prompt",
    "load_sft_dataset",
    "load_text_dataset",
    "load_preference_dataset",
    "answer_of",
]

ExampleKind = Literal["sft", "text", "preference"]
#: What a trial does with its data: train (reads train and eval), or score a model on one
#: held-out split (reads that split only).
Mode = Literal["train", "eval", "test"]
Example = dict[str, str]

#: The form of example each stage reads.
STAGE_EXAMPLES: dict[str, ExampleKind] = {
    "pretrain_proxy": "text",
    "sft": "sft",
    "lora": "sft",
    "dpo": "preference",
    "grpo": "sft",
}

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ASSISTANT = "\n\nAssistant:"
_SYNTHETIC_SEED = 1234  # every trial of every study sees the same synthetic rows
_MAX_SYNTHETIC_ROWS = 1_000_000


def synthetic_sft(n: int, seed: int) -> list[dict[str, str]]:
    """Two-digit additions: prompt "What is 23 plus 45?", completion " 68"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}"})
    return rows


def synthetic_preferences(n: int, seed: int) -> list[dict[str, str]]:
    """The arithmetic task as preference pairs: the right sum is chosen, a near miss not."""
    rng = random.Random(seed)
    rows = []
    for pair in synthetic_sft(n, seed):
        right = int(pair["completion"])
        wrong = right + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])
        rows.append({"prompt": pair["prompt"], "chosen": f" {right}", "rejected": f" {wrong}"})
    return rows


def answer_of(text: str) -> str | None:
    """The last number in a text (how GSM8K-style answers are checked)."""
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def split_shared_prompt(
    chosen: str, rejected: str, marker: str = _ASSISTANT
) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) from two full transcripts (the hh-rlhf layout):
    the prompt is their shared start up to and including the last ``marker`` in it (the
    whole shared start when there is no marker)."""
    n = 0
    for x, y in zip(chosen, rejected, strict=False):
        if x != y:
            break
        n += 1
    cut = chosen.rfind(marker, 0, n)
    cut = n if cut < 0 else cut + len(marker)
    return chosen[:cut], chosen[cut:], rejected[cut:]


# ------------------------------------------------------------------ rows of a source


def _file_rows(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        table = loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
        return list(table.to_list())
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return list(pq.read_table(path).to_pylist())
    try:
        return read_rows(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(
            "runner.data.path", str(e).removeprefix("runner.data.path: ")
        ) from None


def _checked_file_rows(data: DataSource, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The file's rows, after checking every mapped column exists (naming the field)."""
    assert data.path is not None
    path = Path(data.path)
    if not path.exists():
        raise InvalidArgument("runner.data.path", f"{path} does not exist")
    rows = _file_rows(path)
    if not rows:
        raise InvalidArgument("runner.data.path", f"{path.name} holds no rows")
    columns = set(rows[0])
    for key, names in data.columns(keys).items():
        for name in names:
            if name not in columns:
                raise InvalidArgument(
                    f"runner.data.{key}",
                    f"column {name!r} not in {path.name} (columns: {sorted(columns)})",
                )
    return rows


def _text(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    return "" if value is None else str(value)


def _joined(row: Mapping[str, Any], columns: tuple[str, ...]) -> str:
    return "\n".join(_text(row, c) for c in columns if _text(row, c))


_COLUMN_KEYS: dict[ExampleKind, tuple[str, ...]] = {
    "sft": ("prompt_columns", "completion_column"),
    "text": ("text_column",),
    "preference": ("prompt_columns", "chosen_column", "rejected_column"),
}


def _converter(kind: ExampleKind, data: DataSource) -> Callable[[dict[str, Any]], Example | None]:
    """File row -> the stage's example (None: unusable, e.g. a pair with no shared prompt)."""
    prompts = data.prompt_columns
    if kind == "text":
        return lambda row: {"text": _text(row, data.text_column)}
    if kind == "sft":
        return lambda row: {
            "prompt": _joined(row, prompts),
            "completion": " " + _text(row, data.completion_column),
        }

    def to_triple(row: dict[str, Any]) -> Example | None:
        chosen, rejected = _text(row, data.chosen_column), _text(row, data.rejected_column)
        if prompts:
            triple = {"prompt": _joined(row, prompts), "chosen": chosen, "rejected": rejected}
        else:
            p, c, r = split_shared_prompt(chosen, rejected)
            triple = {"prompt": p, "chosen": c, "rejected": r}
        return triple if all(triple.values()) else None

    return to_triple


def _default_key(kind: ExampleKind, data: DataSource) -> tuple[tuple[str, ...], str | None]:
    """(fields, prefix_until) that identify an example of a file when the config names none:
    the prompt, so every answer to one prompt sits on one side; for hh-rlhf-style pairs (no
    prompt columns) the chosen text up to its first assistant turn, so dialogues that open
    with the same human turn share a split (13-gram overlap of held-out rows ~7-9% -> 0)."""
    if kind == "text":
        return (data.text_column,), None
    if data.prompt_columns:
        return data.prompt_columns, None
    return (data.chosen_column,), _ASSISTANT


def _synthetic_rows(kind: ExampleKind, data: DataSource) -> list[dict[str, str]]:
    """Enough synthetic rows that every split with a share gets its size: the generator's
    first n rows are the same for every n, so a larger pool only adds rows."""
    shares = dict(zip(SPLITS, data.split.fractions, strict=True))
    wanted = {s: data.size(s) for s in SPLITS if shares[s] > 0}
    make = synthetic_preferences if kind == "preference" else synthetic_sft
    n = int(max(size / shares[s] for s, size in wanted.items()) * 1.25) + 16
    while True:
        rows = make(n, _SYNTHETIC_SEED)
        counts = dict.fromkeys(SPLITS, 0)
        fractions = SplitFractions(*data.split.fractions)
        for row in rows:
            counts[split_of_key(example_key(row, ("prompt",)), fractions)] += 1
        if all(counts[s] >= size for s, size in wanted.items()) or n >= _MAX_SYNTHETIC_ROWS:
            break
        n *= 2
    if kind == "text":
        return [{"prompt": r["prompt"], "text": r["prompt"] + r["completion"]} for r in rows]
    return rows


# ------------------------------------------------------------------ the splits


@dataclass(frozen=True)
class PreparedSplits:
    """A source cut into splits, cleaned of overlap and cut to size.

    ``rows[split]``: the examples a trial may read, in key order; ``keys[split]``: their
    ``example_key`` (hex); ``available``: rows in each split after dropping overlap, before
    the cut; ``dropped``: held-out rows dropped for overlapping an earlier split.
    """

    kind: ExampleKind
    rows: Mapping[Split, tuple[Example, ...]]
    keys: Mapping[Split, tuple[str, ...]]
    available: Mapping[Split, int]
    dropped: Mapping[Split, int]
    overlap: OverlapReport

    def metrics(self) -> dict[str, float]:
        """Overlap fractions and counts, and dropped rows: what MLflow shows per trial."""
        out = {k: float(v) for k, v in self.overlap.as_metrics().items()}
        out.update(
            {f"overlap.dropped.{s}": float(n) for s, n in self.dropped.items() if s != "train"}
        )
        return out


@functools.lru_cache(maxsize=4)
def prepare_splits(kind: ExampleKind, data: DataSource) -> PreparedSplits:
    """``data`` split, checked for overlap, cleaned and cut to size (see the module doc).

    ``InvalidArgument`` names the ``runner.data`` field of a bad source; ``OverlapRefused``
    (a ``FailedPrecondition``) carries the counts when the splits overlap above
    ``runner.data.max_overlap``. Cached: a trial's config check and its runner share one
    preparation.
    """
    if data.path is None:
        raw: list[dict[str, Any]] = list(_synthetic_rows(kind, data))
        fields: tuple[str, ...] = ("prompt",)
        prefix: str | None = None
        convert: Callable[[dict[str, Any]], Example | None] = (
            (lambda row: {"text": row["text"]}) if kind == "text" else (lambda row: dict(row))
        )
    else:
        raw = _checked_file_rows(data, _COLUMN_KEYS[kind])
        fields, prefix = _default_key(kind, data)
        convert = _converter(kind, data)
    if data.split.fields is not None:  # the team's key replaces the default one whole
        fields, prefix = data.split.fields, data.split.prefix_until
    elif data.split.prefix_until is not None:
        prefix = data.split.prefix_until
    fractions = SplitFractions(*data.split.fractions)
    keyed: dict[str, list[tuple[str, int, Example]]] = {s: [] for s in SPLITS}
    for i, row in enumerate(raw):
        try:
            key = example_key(row, fields, prefix)
        except ValueError as e:
            raise InvalidArgument("runner.data.split.fields", f"row {i}: {e}") from None
        example = convert(row)
        if example is not None:
            keyed[split_of_key(key, fractions)].append((key, i, example))
    for part in keyed.values():
        part.sort(key=lambda item: (item[0], item[1]))
    report = check_overlap(
        {s: [row_text(ex) for _, _, ex in keyed[s]] for s in SPLITS},
        max_fraction=data.max_overlap,
        setting="runner.data.max_overlap",
    )
    clean = without_overlap(keyed, report)
    kept = {s: clean[s][: data.size(s)] for s in SPLITS}
    return PreparedSplits(
        kind=kind,
        rows={s: tuple(ex for _, _, ex in kept[s]) for s in SPLITS},
        keys={s: tuple(key for key, _, _ in kept[s]) for s in SPLITS},
        available={s: len(clean[s]) for s in SPLITS},
        dropped={s: len(keyed[s]) - len(clean[s]) for s in SPLITS},
        overlap=report,
    )


class SplitNotAllowed(RuntimeError):
    """A trial asked for a split its mode may not read (a training trial for test)."""


class TrialData:
    """The splits one trial may read, handed out as ``datasets.Dataset`` and recorded.

    ``mode="train"``: train and eval; ``"eval"``/``"test"``: that split only. Each split
    handed out is written to ``ledger`` (JSON: the mode, and per split its row count and the
    first 16 hex digits of each row's key), so what a trial read can be checked after it
    ran, and counted in ``metrics()`` as ``data.<split>_rows``.
    """

    def __init__(self, prepared: PreparedSplits, mode: Mode, ledger: Path | None = None) -> None:
        self.prepared = prepared
        self.mode = mode
        self.allowed: tuple[Split, ...] = ("train", "eval") if mode == "train" else (mode,)
        self.ledger = ledger
        self.read: dict[Split, int] = {}

    @property
    def held_out(self) -> Split:
        """The split quality is measured on: eval while training, else the scored split."""
        return "eval" if self.mode == "train" else self.mode

    def dataset(self, split: Split) -> Any:
        import datasets

        if split not in self.allowed:
            raise SplitNotAllowed(
                f"a {self.mode}-mode trial may read {' and '.join(self.allowed)}, not {split}"
            )
        rows = self.prepared.rows[split]
        if not rows:
            raise InvalidArgument(
                "runner.data",
                f"no {split} rows: {self.prepared.available[split]} left after dropping "
                f"{self.prepared.dropped[split]} overlapping rows (raise the source's size or "
                f"runner.data.split.fractions.{split})",
            )
        self.read[split] = len(rows)
        self._record()
        return datasets.Dataset.from_list(list(rows))

    def metrics(self) -> dict[str, float]:
        out = self.prepared.metrics()
        out.update({f"data.{s}_rows": float(n) for s, n in self.read.items()})
        return out

    def _record(self) -> None:
        if self.ledger is None:
            return
        record = {
            "mode": self.mode,
            "read": {
                s: {"rows": n, "keys": [k[:16] for k in self.prepared.keys[s]]}
                for s, n in self.read.items()
            },
            "available": dict(self.prepared.available),
            "dropped": dict(self.prepared.dropped),
            "overlap": self.prepared.overlap.as_metrics(),
        }
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        self.ledger.write_text(json.dumps(record, sort_keys=True))


# ------------------------------------------------------------------ training-mode shortcuts


def _train_and_eval(kind: ExampleKind, data: DataSource) -> tuple[Any, Any]:
    loaded = TrialData(prepare_splits(kind, data), "train")
    return loaded.dataset("train"), loaded.dataset("eval")


def load_sft_dataset(data: DataSource) -> tuple[Any, Any]:
    """(train, eval) with ``prompt`` and ``completion`` columns."""
    return _train_and_eval("sft", data)


def load_text_dataset(data: DataSource) -> tuple[Any, Any]:
    """(train, eval) with one ``text`` column: raw text for the pretraining proxy."""
    return _train_and_eval("text", data)


def load_preference_dataset(data: DataSource) -> tuple[Any, Any]:
    """(train, eval) with ``prompt``, ``chosen`` and ``rejected`` columns. With no
    ``prompt_columns`` (DPO's default) the prompt is the shared start of the chosen and
    rejected texts (``split_shared_prompt``), which is how hh-rlhf stores its pairs."""
    return _train_and_eval("preference", data)
