"""Checks of the data file a study names (``runner.data.path``), run where that file is
meant to be: by ``stagetune submit`` on the submitting machine, and by the trial process
on the worker before it loads a model. Never by the server: a spec is a client's request,
and the server answers it the same whether or not a path names a file on the server's
own disk (with auth on, that disk holds other teams' data).

``columns_of`` reads only the head of a file: the first record of JSON/JSONL (plain or
gzipped), the schema of a Parquet file, the features of a saved ``datasets`` folder.
Imports nothing heavy (pyarrow only for Parquet).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import IO, Any

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec import DataSource, StudySpec, parse_runner
from stagetune.contract.stages import CUSTOM, STAGES

__all__ = ["columns_of", "check_data_files", "check_data_source", "SUFFIXES"]

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


def check_data_files(spec: StudySpec) -> None:
    """On the submitting machine: refuse a data file this machine has that lacks a
    column the spec maps, or that is no data file, naming the ``runner.data`` field. A
    path this machine does not have (a worker's own disk) is left to the worker."""
    if spec.stage == CUSTOM.name:
        return  # a custom script reads data of its own: the spec names no file
    data = parse_runner(spec.stage, spec.runner).data
    check_data_source(spec.stage, data, must_exist=False)


def check_data_source(stage: str, data: DataSource, *, must_exist: bool) -> None:
    """Refuse ``data``'s file (when it names one) if it is missing (``must_exist``), of an
    unknown kind, or lacks a column the stage reads; ``InvalidArgument`` names the field.
    A file whose columns cannot be told from its head passes (loading it checks again)."""
    if data.path is None:
        return
    path = Path(data.path)
    if not path.is_dir() and not any(path.name.endswith(s) for s in SUFFIXES):
        raise InvalidArgument(
            "runner.data.path", f"{path.name}: expected a folder or one of {list(SUFFIXES)}"
        )
    if not path.exists():
        if must_exist:
            raise InvalidArgument("runner.data.path", f"{path} does not exist")
        return
    try:
        columns = columns_of(path)
    except (OSError, ValueError) as e:
        raise InvalidArgument("runner.data.path", f"cannot read {path.name}: {e}") from None
    if columns is None:
        return
    for key, names in data.columns(STAGES[stage].data_columns).items():
        for name in names:
            if name not in columns:
                raise InvalidArgument(
                    f"runner.data.{key}",
                    f"column {name!r} not in {path.name} (columns: {sorted(columns)})",
                )
