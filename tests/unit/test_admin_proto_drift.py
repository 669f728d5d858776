"""The checked-in admin API code is exactly what protos/ generates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_admin_code_matches_the_proto(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("generate", REPO / "protos/generate.py")
    assert spec and spec.loader
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)

    produced = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert produced, "protoc produced nothing"
    for relative in produced:
        checked_in = REPO / relative
        assert checked_in.exists(), f"{relative} is generated but not checked in"
        assert checked_in.read_bytes() == (tmp_path / relative).read_bytes(), (
            f"{relative} drifted from protos/: run `python protos/generate.py`"
        )
