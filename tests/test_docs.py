"""The docs site builds with warnings as errors, its CLI reference is current, and every relative
link of the README and the docs points at a file (and heading) that exists."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("**/*.md"))]

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), ![alt](target); text may wrap
_HEADING = re.compile(r"^(#{1,6}) (.+?)\s*$", re.M)


def _prose(text: str) -> str:
    """``text`` without fenced blocks and code spans (links there are code, not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _github_slug(heading: str) -> str:
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _mkdocs_slug(heading: str) -> str:
    from markdown.extensions.toc import slugify

    return str(slugify(heading.replace("`", "").strip(), "-"))


def _anchors(path: Path, *, in_site: bool) -> set[str]:
    """The heading anchors of ``path``: mkdocs' slugs for a docs page, GitHub's otherwise."""
    slug = _mkdocs_slug if in_site else _github_slug
    return {slug(m.group(2)) for m in _HEADING.finditer(_FENCE.sub("", path.read_text("utf-8")))}


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file or heading does not exist."""
    broken = []
    for target in _LINK.findall(_prose(page.read_text("utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        # a docs page links as mkdocs renders it; the README as GitHub renders it
        elif (anchor and dest.suffix == ".md"
              and anchor not in _anchors(dest, in_site=page.is_relative_to(DOCS))):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = _prose((ROOT / "README.md").read_text("utf-8"))
    # index.md is the site's home page (the README's introduction); CONTRACT.md is internal
    pages = {p.name for p in DOCS.glob("*.md") if p.name not in ("CONTRACT.md", "index.md")}
    linked = {Path(t.partition("#")[0]).name for t in _LINK.findall(readme)}
    # the README before its split links results.md only; after it, every page
    if "docs/quickstart.md" in readme:
        assert pages <= linked, pages - linked


def test_cli_reference_is_current() -> None:
    """``docs/cli.md`` is what ``docs/gen_cli.py`` prints now (regenerate: ``python
    docs/gen_cli.py > docs/cli.md``)."""
    proc = subprocess.run([sys.executable, str(DOCS / "gen_cli.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout == (DOCS / "cli.md").read_text("utf-8"), (
        "docs/cli.md is stale: run `python docs/gen_cli.py > docs/cli.md`")


def test_cli_reference_covers_every_subcommand() -> None:
    from simulations.cli import build_parser

    parser = build_parser()
    commands = next(a.choices for a in parser._actions if hasattr(a, "choices")
                    and isinstance(a.choices, dict))
    text = (DOCS / "cli.md").read_text("utf-8")
    assert [c for c in commands if f"## fedmf {c}\n" not in text] == []


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = tmp_path / "site"
    assert (site / "index.html").is_file()
    for page in ("quickstart", "mechanisms", "strategy", "privacy", "experiments", "results",
                 "benchmarks", "cli", "development", "CONTRACT"):
        assert (site / page / "index.html").is_file(), page
    assert (tmp_path / "site" / "results" / "cifar10_accuracy_vs_epsilon.png").is_file()
    # the API reference is rendered from the docstrings: a class, a function, a parameter
    api = {name: (site / "api" / name / "index.html").read_text("utf-8")
           for name in ("fedmf", "strategies", "simulations", "clients")}
    assert 'id="fedmf.ledger.PrivacyLedger"' in api["fedmf"]
    assert 'id="strategies.config.DPConfig"' in api["strategies"]
    assert 'id="simulations.runner.run_simulation"' in api["simulations"]
    assert "min_clients" in api["strategies"]  # DPConfig's attribute docs made it through


def test_readme_is_short() -> None:
    """The README is the front page (what fedmf is, install, the main job, the tests, an
    example, the headline result, links); everything else lives in docs/."""
    lines = (ROOT / "README.md").read_text("utf-8").splitlines()
    assert len(lines) <= 160, len(lines)


def test_readme_python_example_runs_against_the_current_api() -> None:
    """The README's ServerApp snippet: it imports, its DPConfig validates, the strategy builds
    (the ledger calibrates z) and ``start`` is called with the model and the rounds; the
    start itself (a federation) is replaced by a recorder."""
    import torch

    import strategies

    text = (ROOT / "README.md").read_text("utf-8")
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None
    calls: list[dict[str, object]] = []

    class Recording(strategies.DPMatrixFactorizationFedAvg):
        def start(self, **kwargs: object) -> None:  # type: ignore[override]
            calls.append({**kwargs, "strategy": self})

    namespace: dict[str, object] = {"my_model": lambda: torch.nn.Linear(3, 2)}
    code = block.group(1).replace(
        "from strategies import DPConfig, DPMatrixFactorizationFedAvg",
        "from strategies import DPConfig")
    namespace["DPMatrixFactorizationFedAvg"] = Recording
    exec(compile(code, "README.md", "exec"), namespace)
    from flwr.app import Context, RecordDict

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    namespace["app"]._main(None, context)  # type: ignore[attr-defined]
    assert len(calls) == 1 and calls[0]["num_rounds"] == 200
    strategy = calls[0]["strategy"]
    assert strategy.accountant.get_privacy_spent().epsilon == 0.0  # nothing released yet
    assert 0 < strategy.privacy["noise_multiplier"] < 100
