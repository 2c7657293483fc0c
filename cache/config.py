"""Settings: the table machinery every room uses (`Setting`, `resolve`), and the cache's own settings."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import stat
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warmserve.cache.errors import UntrustedCache

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: str | int | None) -> int | None:
    """``"10GiB"``, ``"500M"``, ``"1024"`` -> bytes; ``None``, ``""`` or ``"none"`` -> no budget."""
    if value is None or isinstance(value, int):
        return value
    if value.strip().lower() in ("", "none", "unlimited"):
        return None
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"cannot read {value!r} as a size; use bytes or a unit, like 10GiB or 500M")
    unit = (m.group(2) or "").lower().removesuffix("b")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"use 1/0, true/false or yes/no, got {value!r}")
    return str(value).lower() in ("1", "true", "yes")


def positive(read: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``read``, refusing a result that is not above zero."""

    def read_positive(value: Any) -> Any:
        result = read(value)
        if result <= 0:
            raise ValueError(f"must be positive, got {value!r}")
        return result

    return read_positive


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "warmserve"


@dataclass(frozen=True)
class Setting:
    """One row of a settings table: a key (as config.yaml's ``args`` spell it), its default, what it means,
    how a given value is read, and where else it may come from.

    A value is taken from the first place that gives one (see `resolve`): a command-line option, then the
    config file's ``args``, then the ``env`` variable, then the default.
    """

    key: str
    default: Any
    help: str
    read: Callable[[Any], Any] = str
    env: str | None = None  # the WARMSERVE_* variable, if one may give it (node-level settings and secrets)
    commands: frozenset[str] = frozenset({"build", "run"})  # the warmserve commands with an --option for it
    arg: bool = True  # False: never in a config file (a secret), the environment only
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    shown: str | None = None  # the default as --help shows it, where the value itself would not say it
    field: str | None = None  # the attribute it fills, where that is not ``key``

    @property
    def option(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def attr(self) -> str:
        return self.field or self.key

    def value(self, given: Any, where: str) -> Any:
        """``given`` as this setting holds it; a ValueError naming ``where`` if it cannot be read."""
        if self.choices is not None and given not in self.choices:
            raise ValueError(f"{where}: must be one of {', '.join(self.choices)}, got {given!r}")
        try:
            return self.read(given)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e

    def describe(self) -> str:
        """The --help line: what it means, its default and its variable."""
        shown = self.shown or ("none" if self.default is None else str(self.default))
        return f"{self.help} (default: {shown}{f'; ${self.env}' if self.env else ''})"


# an old variable -> the one that replaced it; read, with a warning, only where the new one is not set
RENAMED = {"WARMSERVE_CACHE_KEY": "WARMSERVE_SIGNING_KEY"}


def resolve(
    table: Sequence[Setting],
    *,
    options: Mapping[str, Any] | None = None,
    args: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    source: str = "the application args",
) -> dict[str, Any]:
    """Every setting of ``table``, keyed by its attribute, from the first place that gives it: ``options``
    (the command line, or a caller's explicit values), ``args`` (``source``, a config file's), ``environ``, the
    default. ``None`` gives nothing. An unknown key or a value that cannot be read is a ValueError naming where
    it was."""
    env = os.environ if environ is None else environ
    options, args = options or {}, args or {}
    known = {s.key: s for s in table}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}")
    in_file = {s.key for s in table if s.arg}
    secret = next((s for s in table if s.key in args and not s.arg), None)
    if secret is not None:
        raise ValueError(f"{secret.key} is a secret, never in a config file: set {secret.env} where it runs instead")
    unknown = sorted(set(args) - in_file)
    if unknown:
        close = {k: difflib.get_close_matches(k, in_file, n=1) for k in unknown}
        hints = "".join(f" ({k}: did you mean {m[0]}?)" for k, m in close.items() if m)
        raise ValueError(f"unknown setting(s) {unknown} in {source}{hints}; known: {sorted(in_file)}")
    variables = {s.env: s.env for s in table if s.env}
    for old, new in RENAMED.items():
        if new in variables and env.get(old):
            warnings.warn(
                f"{old} is deprecated and will be removed: set {new} instead"
                + (f" (both are set; {new} is used)" if env.get(new) else ""),
                FutureWarning,
                stacklevel=3,
            )
            if not env.get(new):
                variables[new] = old
    values: dict[str, Any] = {}
    for s in table:
        if options.get(s.key) is not None:
            values[s.attr] = s.value(options[s.key], s.option)
        elif args.get(s.key) is not None:
            values[s.attr] = s.value(args[s.key], f"args.{s.key}")
        elif s.env and env.get(variables[s.env]):
            values[s.attr] = s.value(env[variables[s.env]], variables[s.env])
        else:
            values[s.attr] = s.default
    return values


def add_options(parser: argparse.ArgumentParser, table: Sequence[Setting], command: str) -> None:
    """An --option for each setting of ``table`` that ``command`` takes, its help saying the default and the
    variable. Every option defaults to None, so that what is not given comes from the next place (`resolve`)."""
    for s in table:
        if command not in s.commands:
            continue
        if s.read is parse_bool:
            parser.add_argument(s.option, action=argparse.BooleanOptionalAction, default=None, help=s.describe())
        else:
            parser.add_argument(s.option, metavar=s.metavar, choices=s.choices, default=None, help=s.describe())


def given(args: argparse.Namespace, table: Sequence[Setting]) -> dict[str, Any]:
    """The settings of ``table`` given on the command line (`add_options`' options that were used)."""
    return {s.key: getattr(args, s.key) for s in table if getattr(args, s.key, None) is not None}


def environment_help(table: Sequence[Setting]) -> str:
    """For an epilog: the settings only the environment gives (secrets)."""
    only = [s for s in table if s.env and not s.commands]
    return "From the environment only: " + "; ".join(f"{s.env}: {s.help}" for s in only) + "."


def _key(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _path(value: str | Path) -> Path:
    return Path(value).expanduser()


def _mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping of options, got {value!r}")
    return dict(value)


# The cache's settings: options of `warmserve build`, `warmserve run` (keys of config.yaml's args) and, for
# where the cache lives, `warmserve cache`; per-node values may come from the environment.
WHERE = frozenset({"build", "run", "cache"})
CACHE_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "cache_dir",
        None,
        "node-local engine cache directory",
        _path,
        env="WARMSERVE_CACHE_DIR",
        commands=WHERE,
        metavar="DIR",
        shown="$XDG_CACHE_HOME/warmserve or ~/.cache/warmserve",
    ),
    Setting(
        "shared_cache",
        None,
        "shared store behind it, e.g. s3://bucket/warmserve",
        env="WARMSERVE_SHARED_CACHE",
        commands=WHERE,
        metavar="URL",
        shown="none, local only",
        field="shared_url",
    ),
    Setting(
        "s3_endpoint_url",
        None,
        "endpoint of an S3-compatible store (MinIO, SeaweedFS...); credentials from the usual AWS_* variables",
        env="WARMSERVE_S3_ENDPOINT_URL",
        commands=WHERE,
        metavar="URL",
        shown="AWS S3",
    ),
    Setting(
        "storage_options",
        None,
        "fsspec options of the shared store (config file only)",
        _mapping,
        commands=frozenset(),
        shown="none",
    ),
    Setting(
        "signing_key",
        None,
        "HMAC key that signs every entry published and is required of every entry read; needed with a shared "
        "store others may write to",
        _key,
        env="WARMSERVE_SIGNING_KEY",
        commands=frozenset(),
        arg=False,
    ),
    Setting(
        "trust_shared_cache",
        False,
        "the shared store can be written only by trusted principals: no signing key needed",
        parse_bool,
        env="WARMSERVE_TRUST_SHARED_CACHE",
        field="trust_shared",
    ),
    Setting(
        "cache_budget",
        20 * 2**30,
        "size the local directory is kept under by evicting the least recently used entries",
        parse_size,
        env="WARMSERVE_CACHE_BUDGET",
        metavar="SIZE",
        shown="20GiB",
        field="local_budget",
    ),
    Setting(
        "shared_cache_budget",
        None,
        "size the shared store is kept under",
        parse_size,
        env="WARMSERVE_SHARED_CACHE_BUDGET",
        metavar="SIZE",
        shown="none, unlimited",
        field="shared_budget",
    ),
    Setting(
        "cache_wait_timeout",
        3600.0,
        "seconds a replica waits for another one's build of the same engine before it gives up",
        positive(float),
        env="WARMSERVE_CACHE_WAIT_TIMEOUT",
        metavar="S",
        field="wait_timeout",
    ),
    Setting(
        "lease_ttl",
        30.0,
        "seconds after a builder's last heartbeat at which its build lease expires and another replica takes over",
        positive(float),
        env="WARMSERVE_LEASE_TTL",
        metavar="S",
    ),
    Setting(
        "peer_cache",
        True,
        "inside a Ray cluster, read engines from the other nodes' cache directories, and let one replica of the "
        "cluster build each (off: this node's directory and the shared store only)",
        parse_bool,
        env="WARMSERVE_PEER_CACHE",
        commands=frozenset({"run"}),
        field="peers",
    ),
    Setting(
        "single_flight",
        True,
        "one replica builds a missing engine while the others wait (off: every replica builds, for benchmarks)",
        parse_bool,
        env="WARMSERVE_SINGLE_FLIGHT",
    ),
)


def _default(key: str) -> Any:
    return next(s.default for s in CACHE_SETTINGS if s.key == key)


@dataclass(frozen=True)
class CacheConfig:
    """The cache's settings, typed; `load` reads them, defaults from `CACHE_SETTINGS`."""

    cache_dir: Path = field(default_factory=default_cache_dir)
    shared_url: str | None = None
    s3_endpoint_url: str | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    signing_key: bytes | None = field(default=None, repr=False)
    local_budget: int | None = _default("cache_budget")
    shared_budget: int | None = _default("shared_cache_budget")
    wait_timeout: float = _default("cache_wait_timeout")
    lease_ttl: float = _default("lease_ttl")
    retry_after: float = 30.0  # seconds before a full disk is tried again (not a setting)
    peers: bool = _default("peer_cache")  # inside a Ray cluster: the peer tier (warmserve.deployments.peers)
    single_flight: bool = _default("single_flight")  # False: every process builds a missing entry itself
    trust_shared: bool = _default("trust_shared_cache")  # True: no signing key needed for a shared store

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> CacheConfig:
        """The environment's settings (`CACHE_SETTINGS`), then explicit ``overrides`` by attribute name
        (``None`` values are ignored)."""
        by_attr = {s.attr: s.key for s in CACHE_SETTINGS}
        unknown = sorted(set(overrides) - set(by_attr) - {"retry_after"})
        if unknown:
            raise TypeError(f"unknown cache setting(s) {unknown}")
        retry_after = overrides.pop("retry_after", None)
        extra = {} if retry_after is None else {"retry_after": retry_after}
        options = {by_attr[name]: value for name, value in overrides.items()}
        return cls.from_values(resolve(CACHE_SETTINGS, options=options, environ=environ), **extra)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], **extra: Any) -> CacheConfig:
        """From `resolve`'s values of `CACHE_SETTINGS` (other keys are ignored)."""
        mine = {s.attr: values[s.attr] for s in CACHE_SETTINGS if s.attr in values}
        for name in ("cache_dir", "storage_options"):  # none given: the field's own default
            if mine.get(name) is None:
                mine.pop(name, None)
        return cls(**mine, **extra)

    def __post_init__(self) -> None:
        for name in ("wait_timeout", "lease_ttl", "retry_after"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def store_options(self) -> dict[str, Any]:
        """The shared store's fsspec options, with the S3 endpoint where one is set for an S3 store."""
        options = dict(self.storage_options)
        if self.s3_endpoint_url and (self.shared_url or "").startswith(("s3://", "s3a://")):
            options.setdefault("endpoint_url", self.s3_endpoint_url)
        return options

    def untrusted_stores(self) -> list[str]:
        """The configured stores that someone else may be able to write to, each with the reason.

        A remote store (S3, GCS...) counts unless ``trust_shared`` says only trusted principals can write
        to it; the local directory counts when everyone can write to it, a shared directory when its group can.
        """
        found = []
        if _others_can_write(self.cache_dir, group=False):
            found.append(f"{self.cache_dir} (local cache directory writable by others)")
        if self.shared_url and not self.trust_shared:
            if "://" in self.shared_url and not self.shared_url.startswith("file://"):
                found.append(f"{self.shared_url} (shared store; its access policy cannot be checked from here)")
            elif _others_can_write(Path(self.shared_url.removeprefix("file://")).expanduser(), group=True):
                found.append(f"{self.shared_url} (shared directory writable by others)")
        return found

    def require_trust(self) -> None:
        """Refuse to run without a signing key when a store others can write to is configured.

        Cache entries hold native code (AOTInductor shared libraries, TensorRT engines) and pickled
        artifacts that warmserve loads; without a signature a writer to the store could run code in every
        replica. With ``signing_key`` set, unsigned and forged entries are refused instead.
        """
        if self.signing_key is not None:
            return
        stores = self.untrusted_stores()
        if stores:
            raise UntrustedCache(
                "refusing to load engines from a cache that others may write to: "
                + "; ".join(stores)
                + ". Entries hold code that every replica loads. Set WARMSERVE_SIGNING_KEY to a secret shared by"
                " your replicas (only entries signed with it are used), or, if only trusted principals can"
                " write to the shared store, set WARMSERVE_TRUST_SHARED_CACHE=1."
            )


def _others_can_write(path: Path, *, group: bool) -> bool:
    """True if the directory at ``path`` is writable by everyone (or, with ``group``, by its group)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False  # not there yet: created later under this process' umask
    return bool(mode & (stat.S_IWOTH | (stat.S_IWGRP if group else 0)))
