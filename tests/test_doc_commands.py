"""Every shell command in the README, the docs and the examples' READMEs is run by a test.

* Each command line is classified by its program; a program without a test here fails
  :func:`test_every_documented_command_is_covered`, so a new command in the docs needs one.
* ``fedmf`` commands: every one parses with the real parser and its configuration validates
  (mechanism names, sampling modes, grid cells) -- quick; the maths commands (``factorize``,
  ``plan``, ``calibrate``) run as written; the simulation commands (``simulate``, ``compare``,
  ``audit``, ``report``) run in a *tiny mode*: the documented flags, then overrides that shrink
  the run (16 clients of tiny generated data, 4 rounds, one seed, ε and schedule) and put it on
  a fast backend, in the order the page gives them, so ``report`` reads what ``compare`` wrote.
* The rest (install, tests, ``flwr run``, the examples, ``bash .ci/run``) is run by the test
  named in :data:`COVERED`.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients_fixtures import write_tiny_bert, write_tiny_cifar, write_tiny_imdb

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md")),
         *sorted((ROOT / "examples").glob("**/README.md"))]
PAGES = [p for p in PAGES if p.name != "CONTRACT.md"]  # internal notes, not user commands

#: Commands run by other tests (program -> where).
COVERED = {
    "python3 -m venv": ".ci/run (a fresh venv, the same install line)",
    ".venv/bin/python -m pytest": ".ci/run (the suite itself)",
    ".venv/bin/ruff": ".ci/run (ruff check .)",
    "bash .ci/run": "CI itself",
    "fedmf demo": "tests/test_simulations_inprocess.py::test_demo_runs_the_main_job_end_to_end",
    "flwr run .": "tests/test_strategy_config.py (bands clamped) and tests/test_deployment.py",
    "flwr run examples/flwr_app": "tests/test_examples.py::test_flwr_app_on_a_local_simulation",
    "bash examples/flwr_app/loopback.sh":
        "tests/test_examples.py::test_flwr_app_against_a_loopback_superlink",
    "python examples/": "tests/test_examples.py (every script)",
    "python -c": "tests/test_simulations_inprocess.py (status.json)",
    "flower-superlink": "tests/test_deployment_restart.py, tests/test_deployment.py",
    "flower-supernode": "tests/test_deployment_restart.py, tests/test_deployment.py",
    "ray start": "tests/test_sharded.py (a two-node Ray cluster on loopback)",
    "export": "an environment variable, no command",
}
MATHS = ("factorize", "plan", "calibrate")
SIMULATION = ("simulate", "compare", "audit", "report")


def _fenced_shell(text: str) -> Iterator[str]:
    """The logical lines of the shell code blocks of ``text`` (continuations joined)."""
    inside, shell, block = False, False, []
    for line in text.splitlines():
        if line.startswith("```"):
            if inside:
                if shell:
                    joined = "\n".join(block).replace("\\\n", " ")
                    yield from joined.splitlines()
                inside, block = False, []
            else:
                inside, shell = True, line[3:].strip() in ("bash", "sh", "shell", "console")
            continue
        if inside:
            block.append(line)


def documented_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for every command line of every page (comments dropped)."""
    found = []
    for page in PAGES:
        for line in _fenced_shell(page.read_text("utf-8")):
            command = re.sub(r"(^|\s)#.*$", "", line).strip()
            if command:
                found.append((str(page.relative_to(ROOT)), command))
    return found


def _fedmf_argv(command: str) -> list[str] | None:
    """The arguments after ``fedmf`` (environment assignments, ``.venv/bin/`` and the
    ``...`` placeholders of "as above" dropped), or ``None`` for another program."""
    words = [w for w in shlex.split(command) if not re.fullmatch(r"[A-Z_]+=.*", w)]
    if not words or Path(words[0]).name != "fedmf":
        return None
    return [w for w in words[1:] if not re.fullmatch(r"\.\.\.(as above\.\.\.)?", w)
            and w not in ("as", "above...")]


def _covered_by(command: str) -> str | None:
    words = [w for w in command.split() if not re.fullmatch(r"[A-Z_]+=.*", w)]
    if words and words[0] == ".venv/bin/fedmf":
        words[0] = "fedmf"
    text = " ".join(words)
    for prefix, where in COVERED.items():
        if text.startswith(prefix):
            return where
    argv = _fedmf_argv(command)
    if argv and argv[0] in MATHS + SIMULATION:
        return "this module"
    return None


def test_every_documented_command_is_covered() -> None:
    commands = documented_commands()
    assert len(commands) >= 30, commands  # the extraction finds the pages' commands
    assert [c for c in commands if _covered_by(c[1]) is None] == []


FEDMF = [(page, argv) for page, cmd in documented_commands()
         if (argv := _fedmf_argv(cmd)) is not None]


@pytest.mark.parametrize(("page", "argv"), FEDMF, ids=[" ".join(a[:3]) for _, a in FEDMF])
def test_documented_fedmf_command_parses_and_validates(page: str, argv: list[str],
                                                       tmp_path: Path) -> None:
    """The parser accepts it (argparse exits on an unknown flag or a bad choice) and the
    configuration it names is valid: the run config, and for a grid every cell."""
    from simulations.cli import _given, _run_config, build_parser, parse_pairs
    from simulations.compare import grid_cells

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{page}: `fedmf {' '.join(argv)}` does not parse (exit {exc.code})")
    if args.command in ("simulate", "compare", "audit"):
        base = _run_config(_given(args), noise_seed=None)
        if args.command == "compare":
            grid_cells(base, mechanisms=args.mechanisms, epsilons=args.epsilons,
                       schedules=args.schedules or [base.dp.schedule],
                       seeds=args.seeds or [0], output=tmp_path)
    if args.command == "report" and args.pairs:
        assert parse_pairs(args.pairs) if isinstance(args.pairs, str) else args.pairs


def _run(argv: list[str]) -> tuple[int, str]:
    from simulations.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue() + err.getvalue()


MATHS_COMMANDS = [(page, argv) for page, argv in FEDMF if argv[0] in MATHS]


@pytest.mark.slow
@pytest.mark.parametrize(("page", "argv"), MATHS_COMMANDS,
                         ids=[" ".join(a[:4]) for _, a in MATHS_COMMANDS])
def test_documented_maths_command_runs(page: str, argv: list[str]) -> None:
    code, output = _run(argv)
    assert code == 0, f"{page}: fedmf {' '.join(argv)}\n{output[-3000:]}"


def _last(argv: list[str], flag: str) -> str | None:
    value = None
    for i, word in enumerate(argv[:-1]):
        if word == flag:
            value = argv[i + 1]
    return value


def tiny(argv: list[str], *, data: Path, bert: Path) -> list[str]:
    """``argv`` shrunk to a tiny run on generated data (the documented flags stay; overrides
    follow them, and argparse keeps the last value)."""
    command = argv[0]
    if command == "report":
        return argv
    out = ["--data-dir", str(data), "--clients", "16", "--clients-per-round", "4",
           "--rounds", "4", "--max-examples-per-client", "0", "--max-test-examples", "20",
           "--eval-every", "2", "--batch-size", "8", "--no-progress"]
    if _last(argv, "--dataset") == "imdb":
        out += ["--model-path", str(bert), "--max-length", "16"]
    from simulations.cli import build_parser

    if build_parser().parse_args(argv).backend == "ray":
        out += ["--backend", "inprocess"]  # the flags are checked; Ray's start-up is not
    if _last(argv, "--ray-address") is not None:  # a cluster's address: a local Ray here
        out += ["--ray-address", "", "--device", "cpu", "--num-gpus-per-shard", "0"]
    if command == "compare":
        for flag in ("--epsilons", "--schedules", "--seeds"):
            if (value := _last(argv, flag)) is not None:
                out += [flag, value.split(",")[0]]
    if command == "audit":
        out += ["--canaries", "4", "--held-out", "4"]
    return argv + out


SIMULATION_PAGES = sorted({page for page, argv in FEDMF if argv[0] in SIMULATION})


@pytest.mark.slow
@pytest.mark.parametrize("page", SIMULATION_PAGES)
def test_documented_simulation_commands_run_in_tiny_mode(
        page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    write_tiny_cifar(data, n_train=160, n_test=20)
    write_tiny_imdb(data, n_train=160, n_test=20)
    bert = write_tiny_bert(tmp_path / "bert")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDMF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDMF_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("FEDMF_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ran = 0
    for where, argv in FEDMF:
        if where != page or argv[0] not in SIMULATION:
            continue
        if argv[0] == "simulate" and "--resume" in argv:
            continue  # `simulate ... --resume` continues the run above: it finished, so
            # resuming it is refused by design (tests/test_simulations_cli.py covers both)
        run = tiny(argv, data=data, bert=bert)
        code, output = _run(run)
        assert code == 0, f"{page}: fedmf {' '.join(run)}\n{output[-4000:]}"
        ran += 1
    assert ran
