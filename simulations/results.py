"""Result files of a simulation run and of a comparison grid (writers and readers).

Per run, in its output directory ``DIR``:

* ``DIR/rounds.jsonl`` -- one JSON object per completed server round, appended (and
  ``fsync``-ed) right after the round's central evaluation: :data:`ROUND_FIELDS`
  (``round, accuracy, loss, epsilon_spent, noise_std, clipped, failures, clip_norm,
  seconds``) plus a few diagnostics (:data:`EXTRA_ROUND_FIELDS`).  A run that was
  interrupted and resumed may repeat a round; :func:`read_rounds` keeps the last line of
  each round.
* ``DIR/summary.json`` -- :data:`SUMMARY_FIELDS` (privacy ledger, accuracies, wall time,
  the full run config, git commit, seeds), written when the run finishes.
* ``DIR/summary.csv`` -- the same as one CSV row (``config`` and ``seeds`` JSON-encoded).
* ``DIR/status.json`` -- ``{"status": "running" | "ok" | "failed", "error": ..., ...}``,
  written by the ServerApp when it starts and when it ends: ``flwr run`` exits 0 even when the
  ServerApp fails, so scripts read this file instead.
* ``DIR/participation.json`` -- rewritten atomically every round: the participation limits
  ``min_sep`` (b), ``max_participations`` (k), ``clients_per_round``, ``rounds`` and, per stable
  client id, the rounds it was sent a training task in.

What is released, and under which guarantee.  The models and everything computed from them
alone (``accuracy``, ``loss`` of the central evaluation on public test data) are covered by the
run's ``(epsilon, delta)``.  The per-round diagnostics :data:`NON_PRIVATE_FIELDS` (``clipped``,
``train_loss``, ``norm_mean``, ...) are computed from the raw client updates: they are **not**
differentially private, are meant for the operator, and ``summary.json`` lists them.  The
participation record is public by design under ``cyclic`` sampling (DP-MF without
amplification does not rely on hiding who took part).  Under amplified sampling
(``balls-in-bins``, ``poisson``, ``cyclic-poisson``) who took part is part of the secret the
guarantee rests on: ``participation.json`` and every per-round count then live only beside the
private checkpoint, the counts in ``rounds.jsonl`` are ``null``, and ``summary.json`` says
``participation_released: false`` (``release-participation = true`` releases them, labelled not
private).  No results file holds the noise seed or noise state: those live only in the
private checkpoint, outside the output folder by default (:func:`default_checkpoint_dir`).

Per grid, ``DIR/results.csv`` holds one row per finished cell (:data:`RESULT_FIELDS`).

JSON is strict: non-finite floats (the infinite epsilon of the non-private ``fedavg``
baseline, a missing accuracy) are written as ``null``; CSV writes them as empty cells.
This module imports neither Flower nor torch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_STATE_DIR",
    "EXTRA_ROUND_FIELDS",
    "NON_PRIVATE_FIELDS",
    "PARTICIPATION_FILE",
    "RESULTS_CSV",
    "RESULT_FIELDS",
    "ROUNDS_FILE",
    "ROUND_FIELDS",
    "STATUS_FILE",
    "SUMMARY_CSV",
    "SUMMARY_FIELDS",
    "SUMMARY_JSON",
    "append_round",
    "cell_name",
    "collect_results",
    "default_checkpoint_dir",
    "git_commit",
    "is_finished",
    "jsonable",
    "read_participation",
    "read_results_csv",
    "read_rounds",
    "read_status",
    "read_summary",
    "result_row",
    "round_record",
    "write_json",
    "write_participation",
    "write_results_csv",
    "write_status",
    "write_summary",
]

ROUNDS_FILE = "rounds.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
RESULTS_CSV = "results.csv"
PARTICIPATION_FILE = "participation.json"
STATUS_FILE = "status.json"
#: Values of ``status.json``'s ``status``.
STATUSES = ("running", "ok", "failed")
#: Root of fedmf's private server state (checkpoints); default ``~/.local/state/fedmf``
#: (``strategies.checkpoint.state_root``).
ENV_STATE_DIR = "FEDMF_STATE_DIR"

#: Required per-round columns, in order.
ROUND_FIELDS = ("round", "accuracy", "loss", "epsilon_spent", "noise_std", "clipped",
                "failures", "clip_norm", "seconds")
#: Further per-round diagnostics.
EXTRA_ROUND_FIELDS = ("rejected", "accepted", "train_loss", "server_lr", "norm_mean")
#: Per-round values computed from raw client updates or replies: NOT differentially private.
NON_PRIVATE_FIELDS = ("clipped", "failures", "rejected", "accepted", "train_loss", "norm_mean",
                      "seconds")
#: Keys of ``summary.json`` (and columns of ``summary.csv``), in order.
SUMMARY_FIELDS = ("mechanism", "dataset", "rounds", "rounds_completed", "epsilon", "delta",
                  "flower_epsilon", "rho", "noise_multiplier", "sensitivity", "sensitivity_exact",
                  "max_participations", "min_sep", "schedule", "server_optimizer",
                  "final_accuracy", "best_accuracy", "final_loss", "wall_seconds", "failures",
                  "config", "git_commit", "seeds", "insecure_reproducible",
                  "non_private_fields", "sampling", "arm", "participation_released",
                  "epsilon_bound", "epsilon_amplified", "epsilon_unamplified", "accountant")
#: Columns of a grid's ``results.csv``.
RESULT_FIELDS = ("cell", "mechanism", "sampling", "epsilon_bound", "epsilon_target", "schedule",
                 "server_optimizer", "seed",
                 "dataset", "rounds", "epsilon", "delta", "rho", "noise_multiplier",
                 "sensitivity", "final_accuracy", "best_accuracy", "final_loss",
                 "wall_seconds", "failures")


# ------------------------------------------------------------------------------ helpers
def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None`` and numpy scalars unwrapped."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int_or_zero(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """``git rev-parse HEAD`` of the repository containing ``path`` (this package by
    default); ``None`` when unavailable (not a git checkout, no commit, no git)."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


# ------------------------------------------------------------------------------ rounds
def round_record(*, server_round: int, eval_metrics: Mapping[str, Any] | None,
                 train_metrics: Mapping[str, Any] | None, seconds: float,
                 withheld: bool = False) -> dict[str, Any]:
    """One ``rounds.jsonl`` object from the central evaluation and the strategy's
    ``last_train_metrics`` of ``server_round``.

    ``withheld``: the run hides who took part (amplified sampling); the participation counts
    are then ``null`` rather than 0.
    """
    ev = dict(eval_metrics or {})
    tr = dict(train_metrics or {})

    def _count(key: str) -> int | None:
        return None if withheld else _int_or_zero(tr.get(key))

    rec: dict[str, Any] = {
        "round": int(server_round),
        "accuracy": _float_or_none(ev.get("accuracy")),
        "loss": _float_or_none(ev.get("loss")),
        "epsilon_spent": _float_or_none(tr.get("epsilon_spent")),
        "noise_std": _float_or_none(tr.get("noise_std")),
        "clipped": _count("num_clipped"),
        "failures": _count("num_failures"),
        "clip_norm": _float_or_none(tr.get("clip_norm")),
        "seconds": round(float(seconds), 4),
        "rejected": _count("num_rejected"),
        "accepted": _count("num_accepted"),
        "train_loss": _float_or_none(tr.get("train-loss")),
        "server_lr": _float_or_none(tr.get("server_lr")),
        "norm_mean": _float_or_none(tr.get("norm_mean")),
    }
    return rec


def append_round(directory: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Append ``record`` as one line to ``directory/rounds.jsonl`` (flushed and fsync-ed)."""
    path = Path(directory) / ROUNDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(jsonable(dict(record)), allow_nan=False)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


def read_rounds(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rounds of ``directory/rounds.jsonl`` sorted by round, the last line of a round
    winning (a resumed run may repeat one); a torn last line is ignored."""
    path = Path(directory) / ROUNDS_FILE
    if not path.is_file():
        return []
    by_round: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("round"), int):
            by_round[rec["round"]] = rec
    return [by_round[r] for r in sorted(by_round)]


def write_participation(directory: str | os.PathLike[str], report: Mapping[str, Any], *,
                        private: bool = False) -> Path:
    """Atomically (re)write ``directory/participation.json`` from a strategy's
    ``participation_report()`` (``private``: file mode 0600, for the copy kept beside the
    private checkpoint under amplified sampling)."""
    path = Path(directory) / PARTICIPATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # rewritten every round: plain JSON types (the usual case) skip the slow walk
        text = json.dumps(dict(report), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        text = json.dumps(jsonable(dict(report)), sort_keys=True)
    _atomic_write(path, text + "\n", private=private)
    return path


def write_status(directory: str | os.PathLike[str], status: str, *,
                 error: str | None = None, **extra: Any) -> Path:
    """Atomically write ``directory/status.json``: ``status`` (:data:`STATUSES`), the error of
    a failed run, and ``extra`` plain values (e.g. ``rounds_completed``)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    path = Path(directory) / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "error": error, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **extra}
    _atomic_write(path, json.dumps(jsonable(record), indent=1, sort_keys=True) + "\n")
    return path


def read_status(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``status.json`` of a run directory, or ``None``."""
    path = Path(directory) / STATUS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def read_participation(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``participation.json`` of a run directory, or ``None``."""
    path = Path(directory) / PARTICIPATION_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def default_checkpoint_dir(output_dir: str | os.PathLike[str]) -> Path:
    """Where a run's private checkpoint goes by default: **outside** its output folder.

    ``$FEDMF_STATE_DIR/checkpoints/<name>-<hash>`` (default root ``~/.local/state/fedmf``),
    keyed by the absolute output path, so results folders can be shared, copied and reported
    without ever carrying the noise seed or noise buffers, and a ``--resume`` of the same
    output folder finds its checkpoint again.
    """
    from strategies.checkpoint import state_root  # the one definition of the root (no torch)

    out = Path(output_dir).expanduser().resolve()
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:16]
    return state_root() / "checkpoints" / f"{out.name}-{digest}"


# ------------------------------------------------------------------------------ summary
def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` (made strict JSON by :func:`jsonable`) to ``path`` atomically."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, json.dumps(jsonable(obj), indent=1, sort_keys=True) + "\n")
    return out


def _atomic_write(path: Path, text: str, *, private: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        if private:  # owner-only, like the checkpoint it sits beside
            os.fchmod(fh.fileno(), 0o600)
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _csv_cell(value: Any) -> Any:
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(jsonable(value), sort_keys=True)
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value


def write_summary(directory: str | os.PathLike[str], summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` and the one-row ``summary.csv`` atomically; return the JSON
    path.  Keys beyond :data:`SUMMARY_FIELDS` are kept (after them)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys = [k for k in SUMMARY_FIELDS if k in summary]
    keys += [k for k in summary if k not in SUMMARY_FIELDS]
    ordered = {k: summary[k] for k in keys}
    path = directory / SUMMARY_JSON
    _atomic_write(path, json.dumps(jsonable(ordered), indent=2, allow_nan=False) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerow({k: _csv_cell(ordered[k]) for k in keys})
    _atomic_write(directory / SUMMARY_CSV, buf.getvalue())
    return path


def read_summary(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``summary.json`` of a run directory, or ``None`` if there is none (or unreadable)."""
    path = Path(directory) / SUMMARY_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_finished(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` holds a complete run (a readable ``summary.json``)."""
    return read_summary(directory) is not None


# ------------------------------------------------------------------------------ grids
def _fmt_number(value: float) -> str:
    return f"{value:g}"


def cell_name(*, mechanism: str, epsilon: float, schedule: str, seed: int) -> str:
    """``<mechanism>_eps<e>_<schedule>_seed<s>``, the directory of one grid cell."""
    return f"{mechanism}_eps{_fmt_number(float(epsilon))}_{schedule}_seed{int(seed)}"


def result_row(cell: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """One ``results.csv`` row from a cell's ``summary.json``."""
    cfg = summary.get("config") or {}
    return {
        "cell": cell,
        "mechanism": summary.get("arm") or summary.get("mechanism", cfg.get("mechanism")),
        "sampling": summary.get("sampling", cfg.get("sampling", "cyclic")),
        "epsilon_bound": summary.get("epsilon_bound", "un-amplified"),
        "epsilon_target": cfg.get("epsilon"),
        "schedule": summary.get("schedule", cfg.get("schedule")),
        "server_optimizer": summary.get("server_optimizer"),
        "seed": cfg.get("seed"),
        "dataset": summary.get("dataset", cfg.get("dataset")),
        "rounds": summary.get("rounds"),
        "epsilon": summary.get("epsilon"),
        "delta": summary.get("delta"),
        "rho": summary.get("rho"),
        "noise_multiplier": summary.get("noise_multiplier"),
        "sensitivity": summary.get("sensitivity"),
        "final_accuracy": summary.get("final_accuracy"),
        "best_accuracy": summary.get("best_accuracy"),
        "final_loss": summary.get("final_loss"),
        "wall_seconds": summary.get("wall_seconds"),
        "failures": summary.get("failures"),
    }


def collect_results(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows for every finished cell (subdirectory with a ``summary.json``) of a grid."""
    root = Path(directory)
    rows = []
    if not root.is_dir():
        return rows
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        summary = read_summary(sub)
        if summary is not None:
            rows.append(result_row(sub.name, summary))
    return rows


def write_results_csv(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str],
                      fields: Sequence[str] = RESULT_FIELDS) -> Path:
    """Write ``rows`` to ``path`` (CSV with header ``fields``) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in fields})
    _atomic_write(path, buf.getvalue())
    return path


def read_results_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a ``results.csv`` with numbers parsed (empty cells -> ``None``)."""
    rows = []
    with Path(path).open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            parsed: dict[str, Any] = {}
            for key, value in row.items():
                if value is None or value == "":
                    parsed[key] = None
                    continue
                try:
                    num = float(value)
                except ValueError:
                    parsed[key] = value
                    continue
                parsed[key] = int(num) if num.is_integer() and "." not in value and (
                    "e" not in value.lower()) else num
            rows.append(parsed)
    return rows
