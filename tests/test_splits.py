"""Deterministic train / eval / test splits: a row's split depends on its content alone."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from stagetune.trainer.splits import (
    SplitFractions,
    SplitSpec,
    assign_split,
    example_key,
    read_rows,
    split_indices,
    split_rows,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _rows(n: int, seed: int = 0, start: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(start, start + n):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        rows.append(
            {
                "instruction": f"Problem {i}: what is {a} times {b}?",
                "input": "",
                "output": f"{a * b}",
            }
        )
    return rows


def _shares(rows: list[dict[str, str]], spec: SplitSpec | None = None) -> dict[str, float]:
    return {name: len(idx) / len(rows) for name, idx in split_indices(rows, spec).items()}


def test_keys_and_splits_are_pinned_across_releases() -> None:
    # A user's test split must not move when stagetune is upgraded: these values are the
    # contract; changing how keys are made must change _KEY_VERSION and these together.
    row = {"instruction": "What is 2 plus 2?", "input": "", "output": "4"}
    assert example_key(row) == example_key(
        {"output": "4", "input": "", "instruction": "What is 2 plus 2?"}
    )
    assert example_key(row) == "4f4d428abbba30332e692a89d7cfec745145e8fb1d47c40e260aca76889452f3"
    assert [assign_split(r) for r in _rows(12)] == [
        "train", "eval", "train", "train", "train", "train",
        "train", "test", "train", "train", "train", "test",
    ]  # fmt: skip


def test_another_process_with_another_hash_seed_assigns_the_same_splits(tmp_path: Path) -> None:
    rows = _rows(2000)
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from stagetune.trainer.splits import read_rows, split_indices\n"
        "print(json.dumps(split_indices(read_rows(Path(sys.argv[1])))))\n"
    )
    env = {
        **os.environ,
        "PYTHONHASHSEED": "12345",
        "PYTHONPATH": f"{REPO / 'proto'}:{REPO / 'trainer'}",
    }
    out = subprocess.run(
        [sys.executable, "-c", script, str(data)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == split_indices(rows)


def test_default_fractions_hold_on_generated_data() -> None:
    shares = _shares(_rows(20_000))
    # Binomial sd of a 10% share over 20,000 rows is 0.2%; 1% is five sd.
    assert shares["train"] == pytest.approx(0.8, abs=0.01)
    assert shares["eval"] == pytest.approx(0.1, abs=0.01)
    assert shares["test"] == pytest.approx(0.1, abs=0.01)


def test_configured_fractions_hold_and_a_zero_split_is_empty() -> None:
    rows = _rows(20_000)
    shares = _shares(rows, SplitSpec(SplitFractions(train=0.6, eval=0.15, test=0.25)))
    assert shares == pytest.approx({"train": 0.6, "eval": 0.15, "test": 0.25}, abs=0.01)
    no_eval = split_indices(rows, SplitSpec(SplitFractions(train=0.9, eval=0.0, test=0.1)))
    assert no_eval["eval"] == []
    assert len(no_eval["train"]) + len(no_eval["test"]) == len(rows)


def test_gsm8k_splits_in_the_configured_fractions() -> None:
    path = SHARED_DATA / "gsm8k-train-alpaca.json"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    rows = read_rows(path)
    assert len(rows) == 7473
    sizes = {name: len(part) for name, part in split_rows(rows).items()}
    assert sizes == {"train": 5971, "eval": 737, "test": 765}
    shares = _shares(rows)
    assert shares == pytest.approx({"train": 0.8, "eval": 0.1, "test": 0.1}, abs=0.015)


def test_appending_and_reordering_rows_moves_no_existing_row() -> None:
    old = _rows(1000)
    before = {json.dumps(r): assign_split(r) for r in old}
    grown = old + _rows(500, seed=1, start=1000)
    random.Random(7).shuffle(grown)
    after_parts = split_rows(grown)
    after = {json.dumps(r): name for name, part in after_parts.items() for r in part}
    assert {k: after[k] for k in before} == before
    assert sum(len(p) for p in after_parts.values()) == 1500


def test_identical_rows_share_a_split_and_only_key_fields_count() -> None:
    rows = _rows(300)
    # Same prompt, other answers: keyed on the prompt, all of them land with the original.
    variants = [{**r, "output": r["output"] + " (checked)"} for r in rows]
    spec = SplitSpec(fields=("instruction", "input"))
    assert [assign_split(r, spec) for r in rows] == [assign_split(v, spec) for v in variants]
    # Keyed on every field, those variants are new examples and many land elsewhere.
    assert [assign_split(r) for r in rows] != [assign_split(v) for v in variants]


def test_prefix_until_keeps_dialogues_with_the_same_opening_together() -> None:
    opening = [f"\n\nHuman: question number {i}?" for i in range(200)]
    first = [
        {"chosen": o + "\n\nAssistant: yes", "rejected": o + "\n\nAssistant: no"} for o in opening
    ]
    second = [
        {"chosen": o + "\n\nAssistant: a\n\nHuman: more?\n\nAssistant: b", "rejected": o}
        for o in opening
    ]
    spec = SplitSpec(fields=("chosen",), prefix_until="\n\nAssistant:")
    assert [assign_split(r, spec) for r in first] == [assign_split(r, spec) for r in second]


def test_bad_split_settings_name_the_field() -> None:
    with pytest.raises(
        ValueError, match=r"^split.fractions: train \+ eval \+ test must be 1, got 1.1"
    ):
        SplitFractions(0.8, 0.1, 0.2)
    with pytest.raises(ValueError, match=r"^split.fractions.eval: must be between 0 and 1"):
        SplitFractions(0.5, -0.1, 0.6)
    with pytest.raises(ValueError, match=r"^split.fractions.validation: unknown split"):
        SplitFractions.from_mapping({"validation": 0.1})
    with pytest.raises(ValueError, match=r"^split.fields: 'prompt' not in row"):
        example_key({"instruction": "x"}, ["prompt"])
    with pytest.raises(ValueError, match=r"^split.shuffle: unknown key"):
        SplitSpec.from_mapping({"shuffle": True})
    spec = SplitSpec.from_mapping(
        {"fractions": {"train": 0.5, "eval": 0.25, "test": 0.25}, "fields": ["chosen"]}
    )
    assert spec == SplitSpec(SplitFractions(0.5, 0.25, 0.25), ("chosen",))


def test_read_rows_reads_json_lists_and_gzipped_jsonl_alike(tmp_path: Path) -> None:
    rows = _rows(5)
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert read_rows(tmp_path / "a.json") == rows == read_rows(tmp_path / "a.jsonl.gz")
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2"):
        read_rows(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"expected .json, .jsonl"):
        read_rows(tmp_path / "a.csv")
