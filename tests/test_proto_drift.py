"""The committed stubs are exactly what `make proto` generates from the committed .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_committed_stubs_match_the_proto_files(tmp_path: Path) -> None:
    protos = sorted((REPO / "proto" / "stagetune" / "v1").glob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(REPO / "proto"),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *map(str, protos),
        ],
        check=True,
    )
    generated = sorted(tmp_path.rglob("*_pb2*.py*"))
    assert generated, "protoc generated nothing"
    stale = []
    for new in generated:
        committed = REPO / "proto" / new.relative_to(tmp_path)
        if not committed.exists() or committed.read_text() != new.read_text():
            stale.append(str(committed.relative_to(REPO)))
    assert not stale, f"stubs out of date, run `make proto`: {stale}"
