"""Every ``--node-config`` / ``--run-config`` string in the README and docs parses with Flower's
own parser (TOML values: strings need quotes), and every run config is a valid fedmf one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from simulations.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
# --flag "..." or --flag '...' (the shell's quotes), as a user would paste it
_PATTERN = re.compile(r"""--(node-config|run-config)\s+(?:"([^"]*)"|'([^']*)')""")


def _strings() -> list[tuple[str, str, str]]:
    found = []
    for path in DOCS:
        for m in _PATTERN.finditer(path.read_text(encoding="utf-8")):
            text = m.group(2) if m.group(2) is not None else m.group(3)
            if text.strip() and "..." not in text:
                found.append((path.name, m.group(1), text))
    return found


def test_docs_have_config_strings() -> None:
    kinds = {kind for _, kind, _ in _strings()}
    assert kinds == {"node-config", "run-config"}


@pytest.mark.parametrize(("doc", "kind", "text"), _strings())
def test_config_string_parses_with_flowers_parser(doc: str, kind: str, text: str) -> None:
    parsed = parse_config_args([text])
    assert parsed, (doc, text)
    if kind == "run-config":
        RunConfig.from_run_config(parsed)  # raises naming the key on a bad value
    else:
        assert all(isinstance(v, str | int | float | bool) for v in parsed.values())
