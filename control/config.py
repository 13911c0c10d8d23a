"""Every option of ``anywan-control``: TOML file < ``ANYWAN_*`` env < flags.

One table (:data:`OPTIONS`) declares each option once: its type, default and
help. From it come the argparse flags (``--api-listen``), the environment
names (``ANYWAN_API_LISTEN``) and the TOML keys (``api_listen``, top level or
under ``[control]``). Precedence: flags > environment > file > defaults.
Errors name where the bad value came from.

(The worker needs the same loader; ``dataplane`` must not import ``control``,
so a shared copy would have to live in ``replication``. Left to the lead.)
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "ANYWAN_"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its name (TOML key; ``--flag`` and ``ANYWAN_*`` derive from
    it) and type; its default is the :class:`ControlConfig` field's."""

    name: str
    type: type
    help: str


OPTIONS: tuple[Option, ...] = (
    Option(
        "state_dir",
        Path,
        "Directory for the SQLite database, the master key and the bus keys",
    ),
    Option("master_key", str, "Master key file (default: <state_dir>/master.key)"),
    Option("api_listen", str, "REST API listen address host:port"),
    Option(
        "metrics_listen",
        str,
        "Extra unauthenticated /metrics listener host:port (empty = only on the API, "
        "operator token)",
    ),
    Option(
        "id_suffix",
        str,
        "Domain suffix of tunnel IKE identities (<tunnel_id>.<account_id>.<suffix>)",
    ),
    Option(
        "ike_listen",
        list,
        "Addresses to serve IKE on directly (UDP 500 and 4500), comma separated; "
        "empty = only through the worker relay",
    ),
    Option("ike_ports", list, "UDP ports for ike_listen"),
    Option("bus_snapshot_endpoint", str, "Bus snapshot (ROUTER) endpoint"),
    Option("bus_update_endpoint", str, "Bus updates (PUB) endpoint"),
    Option("bus_ack_endpoint", str, "Bus acknowledgements endpoint"),
    Option(
        "relay_endpoint",
        str,
        "IKE relay endpoint workers forward IKE to (empty = no relay)",
    ),
    Option("bus_heartbeat_interval", float, "Seconds between bus heartbeats"),
    Option(
        "keys_dir",
        str,
        "CURVE keys: control.key/control.pub and workers/*.pub (default: <state_dir>/keys)",
    ),
    Option("child_lifetime", float, "Child SA rekey time, seconds"),
    Option("ike_lifetime", float, "IKE SA rekey time, seconds"),
    Option("rekey_jitter", float, "Fraction of the lifetime rekeys are moved earlier"),
    Option("dpd_interval", float, "Dead peer detection interval, seconds"),
    Option(
        "rekey_apply_timeout",
        float,
        "Make-before-break: seconds to wait for every worker to apply a new SA",
    ),
    Option("max_account_labels", int, "Cap on distinct account labels in metrics"),
    Option("log_level", str, "debug, info, warning or error"),
)
_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class ControlConfig:
    state_dir: Path = Path("/var/lib/anywan")
    master_key: str = ""
    api_listen: str = "127.0.0.1:8080"
    metrics_listen: str = ""
    id_suffix: str = "ipsec.anywan.example"
    ike_listen: tuple[str, ...] = ()
    ike_ports: tuple[str, ...] = ("500", "4500")
    bus_snapshot_endpoint: str = "tcp://0.0.0.0:7701"
    bus_update_endpoint: str = "tcp://0.0.0.0:7702"
    bus_ack_endpoint: str = "tcp://0.0.0.0:7703"
    relay_endpoint: str = "tcp://0.0.0.0:7704"
    bus_heartbeat_interval: float = 0.5
    keys_dir: str = ""
    child_lifetime: float = 4 * 3600.0
    ike_lifetime: float = 24 * 3600.0
    rekey_jitter: float = 0.1
    dpd_interval: float = 30.0
    rekey_apply_timeout: float = 5.0
    max_account_labels: int = 500
    log_level: str = "info"

    @property
    def master_key_path(self) -> Path:
        return Path(self.master_key) if self.master_key else self.state_dir / "master.key"

    @property
    def keys_path(self) -> Path:
        return Path(self.keys_dir) if self.keys_dir else self.state_dir / "keys"

    def __post_init__(self) -> None:
        for name in ("api_listen", "metrics_listen"):
            value = getattr(self, name)
            if value:
                split_hostport(value, name)
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level: {self.log_level!r} is not debug/info/warning/error")
        for p in self.ike_ports:
            if not p.isdigit() or not 0 < int(p) < 65536:
                raise ConfigError(f"ike_ports: {p!r} is not a port")
        for name in ("bus_heartbeat_interval", "rekey_apply_timeout", "dpd_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0")


assert {f.name for f in fields(ControlConfig)} == set(_BY_NAME), "OPTIONS out of sync"
_DEFAULTS = {f.name: f.default for f in fields(ControlConfig)}


def _show_default(name: str) -> str:
    value = _DEFAULTS[name]
    return ",".join(value) if isinstance(value, tuple) else str(value)


def split_hostport(value: str, name: str = "address") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{name}: {value!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def _coerce(opt: Option, value: Any, source: str) -> Any:
    where = f"{source}: {opt.name}"
    if opt.type is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
            raise ConfigError(f"{where}: must be a list of strings")
        return tuple(str(v) for v in value)
    if opt.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{where}: must be true or false")
    if opt.type in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: must be a number")
        try:
            return opt.type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not a {opt.type.__name__}") from None
    if opt.type is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a path string")
        return Path(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string")
    return value


def read_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not text
        raise ConfigError(f"{path}: cannot read ({type(exc).__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    section = data.get("control", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: control must be a table ([control])")
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    merged = {**top, **section}
    unknown = set(merged) - set(_BY_NAME)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(sorted(unknown))}")
    return merged


def add_arguments(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """One ``--flag`` per option; defaults are None so we can tell 'not given'.

    ``suppress``: for subcommand parsers, so ``anywan-control serve --api-listen X``
    works too without resetting a flag given before the subcommand."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--config", "-c", default=default, help="TOML config file (env ANYWAN_CONFIG)"
    )
    for opt in OPTIONS:
        flag = "--" + opt.name.replace("_", "-")
        env = ENV_PREFIX + opt.name.upper()
        parser.add_argument(
            flag,
            dest=opt.name,
            default=default,
            help=f"{opt.help} [env {env}; default {_show_default(opt.name)}]",
        )


def load(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> ControlConfig:
    env = os.environ if env is None else env
    flags = flags or {}
    values: dict[str, Any] = {}
    path = config_file or flags.get("config") or env.get(ENV_PREFIX + "CONFIG")
    if path:
        for k, v in read_file(Path(path)).items():
            values[k] = _coerce(_BY_NAME[k], v, str(path))
    for opt in OPTIONS:
        name = ENV_PREFIX + opt.name.upper()
        if name in env:
            values[opt.name] = _coerce(opt, env[name], name)
    for opt in OPTIONS:
        if flags.get(opt.name) is not None:
            values[opt.name] = _coerce(opt, flags[opt.name], "--" + opt.name.replace("_", "-"))
    return ControlConfig(**values)


def describe() -> list[tuple[str, str, str, str]]:
    """(TOML key, env var, flag, help) for every option — the README table."""
    return [
        (o.name, ENV_PREFIX + o.name.upper(), "--" + o.name.replace("_", "-"), o.help)
        for o in OPTIONS
    ]


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    return parser.parse_args(argv)
