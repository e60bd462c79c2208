"""The columns of a local data file, read cheaply, so a study that maps a missing column is
refused at submit time rather than when a worker first runs a trial.

Reads only the head of a file: the first record of JSON/JSONL (plain or gzipped), the
schema of a Parquet file, the features of a saved ``datasets`` folder. Imports nothing heavy
(pyarrow only for Parquet).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import IO, Any

__all__ = ["columns_of", "SUFFIXES"]

SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")
_HEAD_BYTES = 1 << 20


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix


def _first_record(stream: IO[str]) -> dict[str, Any] | None:
    head = stream.read(_HEAD_BYTES).lstrip()
    if head.startswith("["):  # a JSON array: decode its first element only
        head = head[1:].lstrip()
    try:
        record, _ = json.JSONDecoder().raw_decode(head)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _features(folder: Path) -> set[str] | None:
    for info in (folder / "dataset_info.json", folder / "train" / "dataset_info.json"):
        if info.exists():
            features = json.loads(info.read_text()).get("features")
            return set(features) if isinstance(features, dict) else None
    return None


def columns_of(path: Path) -> set[str] | None:
    """The column names of a local data file or saved dataset; None when it cannot tell."""
    path = Path(path)
    if path.is_dir():
        return _features(path)
    suffix = _suffix(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(path).names)
    if suffix in (".json", ".jsonl"):
        with path.open(encoding="utf-8", errors="replace") as f:
            record = _first_record(f)
    elif suffix in (".json.gz", ".jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            record = _first_record(f)
    else:
        return None
    return set(record) if record is not None else None
