"""Training data: a synthetic task with checkable answers, and local files.

Every stage runs with no files at all on the synthetic task; real data comes from local
JSON/JSONL/Parquet files or a saved ``datasets`` folder, with the column mapping in the
study config (``runner.data``, typed as ``DataSource``).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from stagetune.contract.spec import DataSource

__all__ = [
    "synthetic_sft",
    "synthetic_preferences",
    "split_shared_prompt",
    "load_sft_dataset",
    "load_text_dataset",
    "load_preference_dataset",
    "answer_of",
]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def synthetic_sft(n: int, seed: int) -> list[dict[str, str]]:
    """Two-digit additions: prompt "What is 23 plus 45?", completion " 68"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}"})
    return rows


def answer_of(text: str) -> str | None:
    """The last number in a text (how GSM8K-style answers are checked)."""
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def _read_rows(path: Path) -> Any:
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    kind = {
        ".json": "json",
        ".jsonl": "json",
        ".jsonl.gz": "json",
        ".json.gz": "json",
        ".parquet": "parquet",
    }.get(suffix)
    if kind is None:
        raise ValueError(f"runner.data.path: {path.name}: expected .json, .jsonl or .parquet")
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def synthetic_preferences(n: int, seed: int) -> list[dict[str, str]]:
    """The arithmetic task as preference pairs: the right sum is chosen, a near miss not."""
    rng = random.Random(seed)
    rows = []
    for pair in synthetic_sft(n, seed):
        right = int(pair["completion"])
        wrong = right + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])
        rows.append({"prompt": pair["prompt"], "chosen": f" {right}", "rejected": f" {wrong}"})
    return rows


def split_shared_prompt(
    chosen: str, rejected: str, marker: str = "\n\nAssistant:"
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


def _rows_from_file(data: DataSource, columns: dict[str, tuple[str, ...]]) -> Any:
    """The file's rows, shuffled with a fixed seed and cut to train + eval size, after
    checking every mapped column exists (naming the ``runner.data`` field)."""
    assert data.path is not None
    path = Path(data.path)
    if not path.exists():
        raise ValueError(f"runner.data.path: {path} does not exist")
    raw = _read_rows(path)
    for key, cols in columns.items():
        for col in cols:
            if col not in raw.column_names:
                raise ValueError(
                    f"runner.data.{key}: column {col!r} not in {path.name} "
                    f"(columns: {raw.column_names})"
                )
    n = min(len(raw), data.train_size + data.eval_size)
    return raw.shuffle(seed=1234).select(range(n))


def _split(table: Any, data: DataSource) -> tuple[Any, Any]:
    eval_n = min(data.eval_size, max(1, len(table) // 5))
    split = table.train_test_split(test_size=eval_n, shuffle=False)
    return split["train"], split["test"]


def _synthetic(data: DataSource, make: Any) -> Any:
    import datasets

    # A fixed seed: every trial of a study sees the same data.
    return datasets.Dataset.from_list(make(data.train_size + data.eval_size, seed=1234))


def load_sft_dataset(data: DataSource, seed: int = 0) -> tuple[Any, Any]:
    """(train, eval) ``datasets.Dataset`` objects with ``prompt`` and ``completion`` columns."""
    if data.path is None:
        return _split(_synthetic(data, synthetic_sft), data)
    prompt_cols = data.prompt_columns
    completion_col = data.completion_column
    raw = _rows_from_file(data, data.columns(("prompt_columns", "completion_column")))

    def to_pair(row: dict[str, Any]) -> dict[str, str]:
        prompt = "\n".join(str(row[c]) for c in prompt_cols if row[c])
        return {"prompt": prompt, "completion": " " + str(row[completion_col])}

    return _split(raw.map(to_pair, remove_columns=raw.column_names), data)


def load_text_dataset(data: DataSource) -> tuple[Any, Any]:
    """(train, eval) with one ``text`` column: raw text for the pretraining proxy."""
    if data.path is None:
        table = _synthetic(
            data,
            lambda n, seed: [
                {"text": r["prompt"] + r["completion"]} for r in synthetic_sft(n, seed)
            ],
        )
        return _split(table, data)
    col = data.text_column
    raw = _rows_from_file(data, data.columns(("text_column",)))
    table = raw.map(lambda row: {"text": str(row[col])}, remove_columns=raw.column_names)
    return _split(table, data)


def load_preference_dataset(data: DataSource) -> tuple[Any, Any]:
    """(train, eval) with ``prompt``, ``chosen`` and ``rejected`` columns.

    With no ``prompt_columns`` (DPO's default) the prompt is split off the shared start of
    the chosen and rejected texts (``split_shared_prompt``), which is how hh-rlhf stores
    its pairs.
    """
    if data.path is None:
        return _split(_synthetic(data, synthetic_preferences), data)
    chosen, rejected = data.chosen_column, data.rejected_column
    prompt_cols = data.prompt_columns
    raw = _rows_from_file(
        data, data.columns(("prompt_columns", "chosen_column", "rejected_column"))
    )

    def to_triple(row: dict[str, Any]) -> dict[str, str]:
        if prompt_cols:
            prompt = "\n".join(str(row[c]) for c in prompt_cols if row[c])
            return {"prompt": prompt, "chosen": str(row[chosen]), "rejected": str(row[rejected])}
        p, c, r = split_shared_prompt(str(row[chosen]), str(row[rejected]))
        return {"prompt": p, "chosen": c, "rejected": r}

    table = raw.map(to_triple, remove_columns=raw.column_names)
    table = table.filter(lambda row: bool(row["prompt"] and row["chosen"] and row["rejected"]))
    if len(table) < 2:
        raise ValueError("runner.data: fewer than 2 usable preference pairs in the file")
    return _split(table, data)
