"""What every bench records beside its figures: the commit and library versions the run
used, and the results written as ``bench/results/<name>.json`` and ``.md``. Imported by the
bench scripts (run as ``python bench/<script>.py``, so this folder is on ``sys.path``)."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def provenance(packages: tuple[str, ...]) -> dict[str, Any]:
    """The short commit of the checkout and each package's installed version."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {"commit": commit, "versions": {p: version(p) for p in packages}}


def write_results(name: str, record: dict[str, Any], markdown: str) -> None:
    """``record`` and its ``markdown`` table under bench/results/, then the table on stdout."""
    out = ROOT / "bench" / "results" / name
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
