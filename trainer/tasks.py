"""Training data: a synthetic task with checkable answers, and local files.

Every stage runs with no files at all on the synthetic task; real data comes from local
JSON/JSONL/Parquet files or a saved ``datasets`` folder, with the column mapping in the
study config.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

__all__ = ["synthetic_sft", "load_sft_dataset", "answer_of"]

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


def load_sft_dataset(data_cfg: dict[str, Any], seed: int) -> tuple[Any, Any]:
    """(train, eval) ``datasets.Dataset`` objects with ``prompt`` and ``completion`` columns."""
    import datasets

    train_size = int(data_cfg.get("train_size", 256))
    eval_size = int(data_cfg.get("eval_size", 32))
    if "synthetic" in data_cfg:
        rows = synthetic_sft(train_size + eval_size, seed=1234)  # fixed: same data every trial
        table = datasets.Dataset.from_list(rows)
    else:
        path = Path(data_cfg["path"])
        if not path.exists():
            raise ValueError(f"runner.data.path: {path} does not exist")
        raw = _read_rows(path)
        prompt_cols = list(data_cfg.get("prompt_columns", ["prompt"]))
        completion_col = str(data_cfg.get("completion_column", "completion"))
        for field, cols in (
            ("prompt_columns", prompt_cols),
            ("completion_column", [completion_col]),
        ):
            for col in cols:
                if col not in raw.column_names:
                    raise ValueError(
                        f"runner.data.{field}: column {col!r} not in {path.name} "
                        f"(columns: {raw.column_names})"
                    )
        n = min(len(raw), train_size + eval_size)
        raw = raw.shuffle(seed=1234).select(range(n))

        def to_pair(row: dict[str, Any]) -> dict[str, str]:
            prompt = "\n".join(str(row[c]) for c in prompt_cols if row[c])
            return {"prompt": prompt, "completion": " " + str(row[completion_col])}

        table = raw.map(to_pair, remove_columns=raw.column_names)
    eval_n = min(eval_size, max(1, len(table) // 5))
    split = table.train_test_split(test_size=eval_n, shuffle=False)
    return split["train"], split["test"]
