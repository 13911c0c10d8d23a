"""``anywan-control``: the control node (IKEv2 responder, REST API, SA publisher).

Subcommands::

    anywan-control init                     # state dir, master key (0600), database
    anywan-control keygen [--worker NAME]   # CURVE keys for the bus
    anywan-control token create --account ACCOUNT | --operator
    anywan-control token list | token revoke ID
    anywan-control serve                    # run everything

Every option comes from flags > ``ANYWAN_*`` env > TOML file > defaults
(:mod:`control.config`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from control import config as cfg
from control.api.validation import ACCOUNT_RE
from control.secrets import MasterKey, SecretError, generate_token, hash_token
from control.store import Store, StoreError

log = logging.getLogger("anywan.control")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anywan-control",
        description="anywan control node: IKEv2 responder, REST API and state publisher.",
    )
    cfg.add_arguments(parser)
    common = argparse.ArgumentParser(add_help=False)
    cfg.add_arguments(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "init", parents=[common], help="create the state dir, master key (0600) and database"
    )
    sub.add_parser(
        "serve", parents=[common], help="run the API, the bus publisher and the IKE responder"
    )
    kg = sub.add_parser(
        "keygen", parents=[common], help="generate CURVE key pairs for the replication bus"
    )
    kg.add_argument("--worker", metavar="NAME", help="a worker key pair (keys_dir/workers/)")
    tok = sub.add_parser("token", help="API tokens").add_subparsers(dest="token_cmd", required=True)
    create = tok.add_parser(
        "create", parents=[common], help="create a token and print it (shown once)"
    )
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument("--account", help="scope the token to this account")
    who.add_argument("--operator", action="store_true", help="a token for every account")
    create.add_argument("--description", default="", help="free text shown by `token list`")
    tok.add_parser("list", parents=[common], help="list tokens (ids and scopes, never the tokens)")
    rev = tok.add_parser("revoke", parents=[common], help="delete a token by id")
    rev.add_argument("token_id")
    return parser


def _open_store(conf: cfg.ControlConfig) -> Store:
    conf.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Store.open(conf.state_dir, MasterKey.load_or_create(conf.master_key_path))


def cmd_init(conf: cfg.ControlConfig) -> int:
    store = _open_store(conf)
    print(
        f"state dir {conf.state_dir}: database {store.path} (schema {store.schema_version}), "
        f"master key {conf.master_key_path}"
    )
    store.close()
    return 0


def cmd_keygen(conf: cfg.ControlConfig, worker: str | None) -> int:
    from replication.curve import generate_keypair

    directory = conf.keys_path / "workers" if worker else conf.keys_path
    pub, key = generate_keypair(directory, worker or "control")
    print(f"public key {pub}\nsecret key {key} (mode 0600)")
    return 0


def cmd_token(conf: cfg.ControlConfig, args: argparse.Namespace) -> int:
    store = _open_store(conf)
    try:
        if args.token_cmd == "create":
            if args.account is not None and not ACCOUNT_RE.match(args.account):
                print(
                    f"anywan-control: --account {args.account!r} is not a valid account id "
                    "(letters, digits, '-', at most 64)",
                    file=sys.stderr,
                )
                return 2
            token = generate_token()
            token_id = uuid.uuid4().hex[:16]
            store.add_token(token_id, hash_token(token), args.account, args.description)
            scope = "operator" if args.operator else f"account {args.account}"
            print(f"token id {token_id} ({scope}); the token is shown only now:", file=sys.stderr)
            print(token)
        elif args.token_cmd == "list":
            for t in store.tokens():
                print(f"{t.token_id}\t{t.account_id or '(operator)'}\t{t.description}")
        elif args.token_cmd == "revoke":
            if not store.delete_token(args.token_id):
                print(f"anywan-control: no token with id {args.token_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.token_id}")
    finally:
        store.close()
    return 0


def _bus_keys(conf: cfg.ControlConfig) -> tuple[bytes, bytes, list[bytes]]:
    """Control's CURVE key pair and the workers' public keys it allows."""
    from replication.curve import load_allowed, load_secret

    public, secret = load_secret(conf.keys_path / "control.key")
    workers_dir = conf.keys_path / "workers"
    return public, secret, load_allowed([workers_dir]) if workers_dir.is_dir() else []


def make_publisher(conf: cfg.ControlConfig, registry: Any) -> Any:
    from replication.publisher import Publisher

    public, secret, allowed = _bus_keys(conf)

    def factory(initial: list[Any]) -> Any:
        return Publisher(
            snapshot_endpoint=conf.bus_snapshot_endpoint,
            update_endpoint=conf.bus_update_endpoint,
            ack_endpoint=conf.bus_ack_endpoint,
            server_public=public,
            server_secret=secret,
            allowed_clients=allowed,
            heartbeat_interval=conf.bus_heartbeat_interval,
            initial=initial,
            registry=registry,
        )

    return factory


def make_relay(conf: cfg.ControlConfig, registry: Any) -> Any:
    """The IKE relay server workers forward IKE datagrams to (None if disabled)."""
    if not conf.relay_endpoint:
        return None
    from replication.relay import RelayServer

    public, secret, allowed = _bus_keys(conf)
    return RelayServer(
        endpoint=conf.relay_endpoint,
        server_public=public,
        server_secret=secret,
        allowed_clients=allowed,
        registry=registry,
    )


def make_engine(conf: cfg.ControlConfig, lookup: Any) -> Any:
    from control.ike.engine import IkeConfig, IkeEngine

    ike = IkeConfig(
        id_suffix=conf.id_suffix,
        child_lifetime=conf.child_lifetime,
        ike_lifetime=conf.ike_lifetime,
        rekey_jitter=conf.rekey_jitter,
        dpd_interval=conf.dpd_interval,
        # Make-before-break: the old Child SA of our rekeys goes once every
        # worker has the new one; this is only the bound for a stuck worker,
        # so it must outlast the service's wait for the bus.
        rekey_delete_delay=max(10.0, 2 * conf.rekey_apply_timeout),
    )
    return IkeEngine(ike, lookup)


async def serve(conf: cfg.ControlConfig) -> int:
    from control.metrics import ControlMetrics
    from control.service import ControlService

    store = _open_store(conf)
    metrics = ControlMetrics(max_accounts=conf.max_account_labels)
    service = ControlService(
        conf,
        store,
        make_publisher(conf, metrics.registry),
        metrics=metrics,
        relay=make_relay(conf, metrics.registry),
    )
    service.engine = make_engine(conf, service.lookup)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
        log.info("anywan-control running (api %s)", conf.api_listen)
        await stop.wait()
    finally:
        await service.stop()
        store.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        conf = cfg.load(vars(args))
    except cfg.ConfigError as exc:
        print(f"anywan-control: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=conf.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "init":
            return cmd_init(conf)
        if args.command == "keygen":
            return cmd_keygen(conf, args.worker)
        if args.command == "token":
            return cmd_token(conf, args)
        try:
            import uvloop
        except ImportError:
            return asyncio.run(serve(conf))
        # Outside the try: an ImportError from inside serve() must not start it twice.
        return uvloop.run(serve(conf))
    except (SecretError, StoreError, OSError) as exc:
        print(f"anywan-control: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if type(exc).__name__ == "CurveKeyError":
            print(f"anywan-control: {exc} (run `anywan-control keygen`)", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
