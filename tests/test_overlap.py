"""Overlap between train, eval and test: exact and 13-gram near duplicates, and the refusal."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from stagetune.contract.errors import FailedPrecondition
from stagetune.trainer.overlap import (
    DEFAULT_MAX_FRACTION,
    OverlapRefused,
    check_overlap,
    measure_overlap,
    normalise_text,
    row_text,
    without_overlap,
)
from stagetune.trainer.splits import SplitSpec, read_rows, split_rows

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _sentences(n: int, seed: int, words: int = 30) -> list[str]:
    """Random sentences over a large vocabulary: no 13-gram is shared by chance."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(50_000)]
    return [" ".join(rng.choices(vocab, k=words)) for _ in range(n)]


def _brute_force(reference: list[str], held_out: list[str], n: int = 13) -> tuple[int, int]:
    """(exact, near) by comparing every pair of rows: the oracle the fast index must match."""

    def grams(text: str) -> set[tuple[str, ...]]:
        w = normalise_text(text).split()
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}

    exact = near = 0
    for h in held_out:
        if any(normalise_text(h) == normalise_text(r) for r in reference):
            exact += 1
        elif any(grams(h) & grams(r) for r in reference):
            near += 1
    return exact, near


def test_normalised_text_ignores_case_punctuation_and_spacing() -> None:
    assert normalise_text("  Natalia sold 48/2 = 24 clips\tin MAY!\n") == (
        "natalia sold 482 24 clips in may"
    )
    assert normalise_text("Ｆｕｌｌ-width, “quoted”…") == "fullwidth quoted"


def test_clean_data_passes_with_zero_counts() -> None:
    texts = _sentences(1200, seed=0)
    splits = {"train": texts[:1000], "eval": texts[1000:1100], "test": texts[1100:]}
    report = check_overlap(splits, max_fraction=0.0)
    assert [(p.held_out, p.reference, p.exact, p.near) for p in report.pairs] == [
        ("eval", "train", 0, 0),
        ("test", "train", 0, 0),
        ("test", "eval", 0, 0),
    ]
    assert report.sizes == {"train": 1000, "eval": 100, "test": 100}


def test_exact_and_near_duplicates_are_counted_and_the_stage_refused() -> None:
    train = _sentences(200, seed=1)
    fresh = _sentences(100, seed=2)
    # 5 copies of train rows that differ only in case, punctuation and spacing,
    # 3 rows that share exactly 13 words of a train row, 2 that share only 12 (not counted).
    eval_rows = [t.upper().replace(" ", " ,  ", 3) + "!" for t in train[:5]]
    eval_rows += [f"{fresh[i]} {' '.join(train[10 + i].split()[5:18])} end" for i in range(3)]
    eval_rows += [f"{fresh[3 + i]} {' '.join(train[20 + i].split()[5:17])} end" for i in range(2)]
    eval_rows += fresh[10:50]
    test_rows = [eval_rows[20], eval_rows[21]] + fresh[50:98]
    splits = {"train": train, "eval": eval_rows, "test": test_rows}

    with pytest.raises(OverlapRefused) as refused:
        check_overlap(splits, max_fraction=0.05)
    message = str(refused.value)
    assert "overlap.max_fraction=0.05" in message
    assert "eval vs train: 8 of 50 rows (16.00%) overlap (5 exact duplicates, 3 more" in message
    assert "test vs eval: 2 of 50 rows (4.00%)" not in message  # below the limit: not named
    assert isinstance(refused.value, FailedPrecondition)  # FAILED_PRECONDITION on the wire
    counts = {(p.held_out, p.reference): (p.exact, p.near) for p in refused.value.report.pairs}
    assert counts == {
        ("eval", "train"): (5, 3),
        ("test", "train"): (0, 0),
        ("test", "eval"): (2, 0),
    }


def test_a_duplicate_laden_file_is_refused_with_the_counts_an_exhaustive_search_finds(
    tmp_path: Path,
) -> None:
    base = _sentences(400, seed=3, words=20)
    rng = random.Random(4)
    rows = [{"instruction": t, "output": str(i)} for i, t in enumerate(base)]
    # A scraped file: a quarter of its rows re-posted with other casing, punctuation or a
    # changed answer, a tenth quoting 15 words of another row.
    rows += [
        {"instruction": r["instruction"].title() + "?", "output": r["output"]}
        for r in rng.sample(rows, 100)
    ]
    rows += [
        {"instruction": "quote " + " ".join(r["instruction"].split()[:15]), "output": "x"}
        for r in rng.sample(rows[:400], 40)
    ]
    path = tmp_path / "scraped.json"
    path.write_text(json.dumps(rows))

    parts = split_rows(read_rows(path))
    texts = {name: [row_text(r) for r in part] for name, part in parts.items()}
    with pytest.raises(OverlapRefused) as refused:
        check_overlap(texts)
    found = {(p.held_out, p.reference): (p.exact, p.near) for p in refused.value.report.pairs}
    expected = {
        (held, ref): _brute_force(texts[ref], texts[held])
        for held, ref in [("eval", "train"), ("test", "train"), ("test", "eval")]
    }
    assert found == expected
    assert sum(exact + near for exact, near in found.values()) > 10
    for (held, ref), (exact, near) in found.items():
        pair = f"{held} vs {ref}: {exact + near} of {len(texts[held])} rows"
        overlapping = (exact + near) / len(texts[held])
        assert (pair in str(refused.value)) == (overlapping > DEFAULT_MAX_FRACTION)


def test_dropping_the_overlapping_rows_leaves_splits_that_pass() -> None:
    train = _sentences(100, seed=5)
    held = [train[0].upper(), *_sentences(20, seed=6)]
    splits = {"train": train, "eval": held, "test": [held[3], train[1], *_sentences(5, seed=7)]}
    report = measure_overlap(splits)
    clean = without_overlap(splits, report)
    assert clean["train"] == train
    assert clean["eval"] == held[1:]
    assert clean["test"] == splits["test"][2:]
    assert check_overlap(clean, max_fraction=0.0).exceeding(0.0) == []


def test_a_fraction_at_the_limit_passes_and_bad_limits_name_the_field() -> None:
    train = _sentences(10, seed=8)
    splits = {"train": train, "eval": [train[0], *_sentences(9, seed=9)]}
    assert check_overlap(splits, max_fraction=0.1).pairs[0].fraction == pytest.approx(0.1)
    with pytest.raises(OverlapRefused):
        check_overlap(splits, max_fraction=0.099)
    with pytest.raises(ValueError, match=r"^overlap.max_fraction: must be between 0 and 1"):
        check_overlap(splits, max_fraction=5)
    with pytest.raises(ValueError, match=r"^overlap.ngram: must be an integer >= 1"):
        measure_overlap(splits, ngram=0)


def _real(name: str) -> list[dict[str, str]]:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    return read_rows(path)


def _counts(
    rows: list[dict[str, str]], spec: SplitSpec | None = None
) -> dict[str, tuple[int, ...]]:
    parts = split_rows(rows, spec)
    started = time.perf_counter()
    report = measure_overlap({n: [row_text(r) for r in p] for n, p in parts.items()})
    assert time.perf_counter() - started < 20  # about 1.5 s for GSM8K on this 2-core CPU
    return {f"{p.held_out}/{p.reference}": (p.exact, p.near, p.held_out_rows) for p in report.pairs}


def test_gsm8k_has_no_exact_duplicates_across_splits_and_about_one_percent_near() -> None:
    # GSM8K holds rephrased variants of some problems: they share 13-grams across splits.
    counts = _counts(_real("gsm8k-train-alpaca.json"))
    assert counts == {
        "eval/train": (0, 8, 737),
        "test/train": (0, 9, 765),
        "test/eval": (0, 3, 765),
    }


def test_hh_rlhf_overlaps_unless_split_by_the_opening_human_turn() -> None:
    rows = _real("hh-rlhf-harmless-base-test.jsonl.gz")
    # Several dialogues open with the same human turn: split row by row, ~9% of held-out
    # rows share a 13-gram with train; keyed on the opening turn, one row of 238 does.
    assert _counts(rows) == {
        "eval/train": (0, 20, 215),
        "test/train": (0, 23, 235),
        "test/eval": (0, 0, 235),
    }
    by_opening = SplitSpec(fields=("chosen",), prefix_until="\n\nAssistant:")
    assert _counts(rows, by_opening) == {
        "eval/train": (0, 1, 238),
        "test/train": (0, 0, 243),
        "test/eval": (0, 0, 243),
    }
