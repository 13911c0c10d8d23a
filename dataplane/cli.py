"""``anywan-worker``: the per-core anycast worker process.

Every option comes from, in this order of precedence: a command-line flag,
an ``ANYWAN_<OPTION>`` environment variable (``--metrics-port`` →
``ANYWAN_METRICS_PORT``), the ``[worker]`` table of the TOML file given with
``--config`` (keys with underscores: ``metrics_port = 9411``), the default.

Exit codes: 0 after a clean SIGTERM/SIGINT shutdown, 2 for a configuration or
startup error (printed as one line saying what to fix), 1 for anything else.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

# (flag, type, default, help). type "bool" is a switch.
OPTIONS: list[tuple[str, Any, Any, str]] = [
    ("netns", str, None, "enter this network namespace (the node's) before anything else"),
    ("anycast", str, None, "the anycast address every socket binds (must be on an interface)"),
    ("index", int, 0, "this worker's index on the node; also its ESP IV/sequence space"),
    ("node", str, "node", "node name (worker id on the bus is <node>/<index>)"),
    ("workers", int, 1, "worker indices the node may run (raw ESP/GRE share)"),
    ("run-dir", str, "/run/anywan", "directory for the node's worker lock files"),
    ("tun-name", str, "aw0", "TUN device name inside each account namespace"),
    (
        "netns-template",
        str,
        "anywan-{account}",
        "per-account network namespace name; empty: all TUNs in this namespace",
    ),
    ("tun-mtu", int, 1500, "MTU of the TUN devices (tunnel MTUs are enforced per tunnel)"),
    ("no-mss-clamp", "bool", False, "do not clamp TCP MSS on SYNs"),
    ("metrics-addr", str, "127.0.0.1", "address of the Prometheus /metrics server"),
    ("metrics-port", int, 9410, "port of the /metrics server (0 = off)"),
    ("bus-snapshot", str, None, "bus snapshot endpoint, e.g. tcp://10.0.0.1:5556"),
    ("bus-updates", str, None, "bus update endpoint"),
    ("bus-acks", str, None, "bus ack endpoint"),
    ("bus-server-key", str, None, "control's CURVE public key file (.pub)"),
    ("bus-client-key", str, None, "this worker's CURVE secret key file (.key)"),
    ("bus-timeout", float, 10.0, "seconds to wait for the first snapshot"),
    ("relay-endpoint", str, None, "control's IKE relay endpoint (same CURVE keys)"),
    (
        "handoff-addr",
        str,
        None,
        "this worker's address on the cluster network for cross-node handoff of "
        "replay-protected SAs; default: the source address toward the bus host; off: none",
    ),
    (
        "handoff-port",
        int,
        7790,
        "UDP port of the node's cross-node handoff endpoint (the same for all its workers)",
    ),
    ("state-file", str, None, "msgpack list of [key, record] to apply at start (tests)"),
    ("listen", str, "esp,gre,udp4500,udp500", "outer listeners to open"),
    ("duration", float, 0.0, "exit after this many seconds (0 = run until SIGTERM)"),
    ("log-level", str, "INFO", "logging level"),
]


class ConfigError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anywan-worker",
        description="anywan anycast worker: carries ESP, ESP-in-UDP and GRE tunnels "
        "between the anycast address and a TUN device, with state from the control node. "
        "Every option may also be set as ANYWAN_<OPTION> or in the [worker] table of "
        "--config.",
    )
    p.add_argument("--config", help="TOML file with a [worker] table")
    for flag, typ, default, text in OPTIONS:
        if typ == "bool":
            p.add_argument(f"--{flag}", action="store_true", default=None, help=text)
        else:
            p.add_argument(f"--{flag}", type=typ, default=None, help=f"{text} (default: {default})")
    return p


def resolve(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """Merge flags > environment > TOML > defaults into one dict."""
    toml: dict[str, Any] = {}
    config_path = args.config or env.get("ANYWAN_CONFIG")
    if config_path:
        try:
            with open(config_path, "rb") as fh:
                toml = tomllib.load(fh).get("worker", {})
        except OSError as exc:
            raise ConfigError(f"cannot read config {config_path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {config_path} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    known = set()
    for flag, typ, default, _ in OPTIONS:
        name = flag.replace("-", "_")
        known.add(name)
        value = getattr(args, name)
        if value is None:
            raw = env.get("ANYWAN_" + name.upper())
            if raw is not None:
                try:
                    value = raw.lower() in ("1", "true", "yes", "on") if typ == "bool" else typ(raw)
                except ValueError:
                    raise ConfigError(
                        f"ANYWAN_{name.upper()}={raw!r} is not a valid value"
                    ) from None
        if value is None and name in toml:
            value = toml[name]
        if value is None:
            value = default
        out[name] = value
    unknown = set(toml) - known
    if unknown:
        raise ConfigError(f"unknown keys in [worker] of {config_path}: {sorted(unknown)}")
    return out


def make_config(o: dict[str, Any]) -> Any:
    from replication import curve

    from .worker import WorkerConfig

    if not o["anycast"]:
        raise ConfigError("--anycast (ANYWAN_ANYCAST) is required")
    bus = relay = None
    bus_opts = [o["bus_snapshot"], o["bus_updates"], o["bus_acks"]]
    if any(bus_opts) or o["relay_endpoint"]:
        if o["bus_snapshot"] and not all(bus_opts):
            raise ConfigError("--bus-snapshot, --bus-updates and --bus-acks go together")
        if not o["bus_server_key"] or not o["bus_client_key"]:
            raise ConfigError("the bus needs --bus-server-key and --bus-client-key")
        try:
            server_public = curve.load_public(o["bus_server_key"])
            client_public, client_secret = curve.load_secret(o["bus_client_key"])
        except (OSError, ValueError) as exc:
            raise ConfigError(f"CURVE key files: {exc}") from None
        keys = {
            "server_public": server_public,
            "client_public": client_public,
            "client_secret": client_secret,
        }
        if o["bus_snapshot"]:
            bus = {
                "snapshot_endpoint": o["bus_snapshot"],
                "update_endpoint": o["bus_updates"],
                "ack_endpoint": o["bus_acks"],
                "connect_timeout": o["bus_timeout"],
                **keys,
            }
        if o["relay_endpoint"]:
            relay = {"endpoint": o["relay_endpoint"], **keys}
    listen = tuple(x.strip() for x in o["listen"].split(",") if x.strip())
    bad = set(listen) - {"esp", "gre", "udp4500", "udp500"}
    if bad:
        raise ConfigError(f"--listen: unknown listeners {sorted(bad)}")
    if not 0 <= o["index"] < max(1, o["workers"]):
        raise ConfigError(f"--index {o['index']} must be in 0..--workers-1")
    if not 0 < o["handoff_port"] <= 65535:
        raise ConfigError("--handoff-port must be in 1..65535")
    if o["index"] > 255:
        raise ConfigError("--index must be below 256 (8 bits of the GCM IV)")
    return WorkerConfig(
        anycast=o["anycast"],
        index=o["index"],
        node=o["node"],
        workers=o["workers"],
        run_dir=Path(o["run_dir"]),
        tun_name=o["tun_name"],
        netns_template=o["netns_template"] or None,
        tun_mtu=o["tun_mtu"],
        mss_clamp=not o["no_mss_clamp"],
        metrics_addr=o["metrics_addr"],
        metrics_port=o["metrics_port"],
        bus=bus,
        relay=relay,
        state_file=Path(o["state_file"]) if o["state_file"] else None,
        listen=listen,
        handoff_addr=o["handoff_addr"],
        handoff_port=o["handoff_port"],
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = resolve(args, dict(os.environ))
        logging.basicConfig(
            level=str(opts["log_level"]).upper(),
            format="%(asctime)s anywan-worker %(levelname)s %(message)s",
        )
        cfg = make_config(opts)
    except (ConfigError, ValueError) as exc:
        print(f"anywan-worker: {exc}", file=sys.stderr)
        return 2

    from .tun import TunError, enter_netns
    from .worker import StartupError, Worker, install_signal_handlers

    if opts["netns"]:
        # Whole process (no threads yet), and unlike `ip netns exec` no private
        # mount namespace: account namespaces we create stay visible to all.
        try:
            enter_netns(opts["netns"])
        except OSError as exc:
            print(f"anywan-worker: cannot enter netns {opts['netns']}: {exc}", file=sys.stderr)
            return 2
    worker = Worker(cfg)
    try:
        try:
            worker.start()
            worker.apply_pending()
        except (StartupError, TunError) as exc:
            print(f"anywan-worker: {exc}", file=sys.stderr)
            return 2
        install_signal_handlers(worker)
        # `kill -USR1 <pid>` writes every thread's stack to stderr (the log):
        # what a stuck worker is doing, without stopping it
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        logging.getLogger("anywan.worker").info(
            "worker %s serving %s (%d accounts)",
            cfg.worker_id,
            cfg.anycast,
            len(worker.dp.accounts),
        )
        profile = os.environ.get("ANYWAN_PROFILE")  # debugging aid: cProfile dump path
        if profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
            try:
                worker.run(duration=opts["duration"] or None)
            finally:
                prof.disable()
                prof.dump_stats(f"{profile}.{os.getpid()}")
        else:
            worker.run(duration=opts["duration"] or None)
        return 0
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main())
