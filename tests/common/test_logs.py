"""Log calls never pass `extra` keys that LogRecord reserves: such a call raises KeyError, and
only when its level is enabled, which a test run at another level would never see."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def test_no_log_call_overwrites_a_record_attribute() -> None:
    clashes = []
    for path in [*ROOT.glob("servers/**/*.py"), *ROOT.glob("gateway/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            for keyword in node.keywords:
                if keyword.arg == "extra" and isinstance(keyword.value, ast.Dict):
                    for key in keyword.value.keys:
                        if isinstance(key, ast.Constant) and key.value in RESERVED:
                            clashes.append(f"{path.relative_to(ROOT)}:{node.lineno} {key.value}")
    assert clashes == []
