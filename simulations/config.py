"""``RunConfig``: one run's configuration, parsed and validated once.

A run configuration is three frozen parts, each the single definition of its keys' names,
types and defaults:

* ``client`` -- :class:`clients.config.ClientConfig` (data, model, local training);
* ``dp`` -- :class:`strategies.config.DPConfig` (mechanism, cohorts, server optimizer,
  clipping, privacy);
* ``run`` -- :class:`RunOptions` (where results go, how often to evaluate).

``num-clients`` and ``seed`` belong to both the client part (the partition) and the DP part
(the cohorts); they are parsed once and handed to both.  A setting travels one way::

    CLI flags / --run-config / pyproject table / context.run_config
        -> RunConfig.from_run_config(...)         (unknown keys and bad values name the key)
        -> .client  -> ClientApps (each reads its part once per process)
        -> .dp      -> strategies.build_strategy -> DPMatrixFactorizationFedAvg / flower-dp
        -> .run     -> the ServerApp's result writer

``RunConfig().to_run_config()`` *is* the ``[tool.flwr.app.config]`` table of pyproject.toml (a
test checks it), so the defaults exist once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.config import ClientConfig
from fedmf import runconfig
from strategies.config import DPConfig

__all__ = ["PATH_KEYS", "RunConfig", "RunOptions", "known_keys", "parse_run_config_text"]

#: Run-config keys that name paths (made absolute: Ray workers and Flower's subprocesses do
#: not share the caller's working directory).
PATH_KEYS = ("data-dir", "model-path", "checkpoint-dir", "output-dir")
_SHARED = ("num-clients", "seed")


@dataclass(frozen=True)
class RunOptions:
    """Where a run's results go and how often the server evaluates.

    Attributes:
        output_dir: the results folder (``""``: nothing is written).
        eval_every: central evaluation every this many rounds (and after the last).
    """

    output_dir: str = ""
    eval_every: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or (
                self.eval_every < 1):
            raise ValueError(f"eval-every must be an int >= 1, got {self.eval_every!r}")


def known_keys() -> list[str]:
    """Every run-config key, sorted."""
    return sorted({*runconfig.keys(ClientConfig), *runconfig.keys(DPConfig),
                   *runconfig.keys(RunOptions)})


@dataclass(frozen=True)
class RunConfig:
    """A run's configuration (see the module docstring)."""

    client: ClientConfig = field(default_factory=ClientConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        for key in _SHARED:
            name = key.replace("-", "_")
            if getattr(self.client, name) != getattr(self.dp, name):
                raise ValueError(f"{key}: the client and DP parts disagree "
                                 f"({getattr(self.client, name)!r} vs {getattr(self.dp, name)!r})")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], *,
                        noise_seed: int | None = None) -> RunConfig:
        """Parse a flat run config (Flower's ``context.run_config``, TOML values or strings).

        Missing keys take their defaults; an unknown key or a bad value raises ``ValueError``
        naming the key.  ``noise_seed`` (server-side only) goes to the DP part.
        """
        known = set(known_keys())
        for key in run_config:
            if str(key).replace("_", "-") not in known:
                hint = (" (the noise seed is never a run-config key: see "
                        "DPConfig.from_run_config)" if "noise-seed" in str(key) else "")
                raise ValueError(f"{key}: unknown run-config key{hint} (known: "
                                 f"{', '.join(sorted(known))})")
        dp_overrides = {} if noise_seed is None else {"noise_seed": noise_seed}
        return cls(client=ClientConfig.from_run_config(run_config),
                   dp=DPConfig.from_run_config(run_config, **dp_overrides),
                   run=runconfig.from_run_config(RunOptions, run_config))

    def to_run_config(self) -> dict[str, Any]:
        """The flat run config (what every ClientApp receives; never the noise seed)."""
        return {**self.client.to_run_config(), **self.dp.to_run_config(),
                **runconfig.to_run_config(self.run)}

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with run-config keys changed (``replace(**{"num-clients": 4})`` or field
        names): each part that owns a changed key is copied and validated again (no flatten
        and re-parse); the noise seed is kept."""
        known = set(known_keys())
        for key in changes:
            if key.replace("_", "-") not in known:
                raise ValueError(f"{key}: unknown run-config key")
        return RunConfig(client=runconfig.replace(self.client, changes),
                         dp=runconfig.replace(self.dp, changes),
                         run=runconfig.replace(self.run, changes))

    @property
    def noise_seed(self) -> int | None:
        """The fixed noise seed (``None``: secret, drawn by the strategy)."""
        return None if self.dp.noise_seed < 0 else self.dp.noise_seed

    def absolute(self) -> RunConfig:
        """The same configuration with its path keys (:data:`PATH_KEYS`) made absolute."""
        changes = {}
        for key in PATH_KEYS:
            value = self._value(key)
            if value and str(Path(value).expanduser().resolve()) != value:
                changes[key] = str(Path(value).expanduser().resolve())
        return self.replace(**changes) if changes else self

    def _value(self, key: str) -> Any:
        """The value of run-config ``key`` (from the part that owns it)."""
        name = key.replace("-", "_")
        for part in (self.run, self.client, self.dp):
            if key in runconfig.keys(type(part)):
                return getattr(part, name)
        raise KeyError(key)

    @property
    def output_dir(self) -> Path | None:
        """The results folder, or ``None``."""
        return Path(self.run.output_dir) if self.run.output_dir else None

    def describe(self) -> str:
        """One line for logs and progress bars."""
        dp = self.dp
        eps = "non-private" if not dp.is_private else f"eps={dp.epsilon:g}"
        from fedmf.mechanisms import arm_label

        return f"{arm_label(dp.mechanism, dp.sampling)} {eps} {dp.schedule} seed={dp.seed}"


def parse_run_config_text(text: str | None) -> dict[str, Any]:
    """Parse ``"k1=v1 k2=v2"`` (``flwr run --run-config`` syntax: values are TOML, bare words
    are strings) into a dict."""
    import shlex
    import tomllib

    out: dict[str, Any] = {}
    if not text:
        return out
    for token in shlex.split(text):
        if "=" not in token:
            raise ValueError(f"run-config: expected key=value, got {token!r}")
        key, raw = token.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"run-config: empty key in {token!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key] = value
    return out
