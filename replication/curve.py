"""CURVE key pairs for the bus, and the ZAP allow-list every bus server uses.

Every bus socket is CURVE-encrypted (DESIGN §4, RFC 26 CurveZMQ): control holds
the server key pair, each worker (or forwarder) a client key pair whose public
half control allow-lists. Key files use the ZeroMQ certificate format (ZPL),
so ``zmq.auth.load_certificate`` and czmq tools read them too:

* ``<name>.pub``: the public key only, safe to copy to other nodes.
* ``<name>.key``: public and secret key; created with mode 0600 by ``os.open``
  (never chmod'ed after the fact, so there is no moment where it is readable),
  and refused at load time if group or others can read it, like OpenSSH does.

Secret keys never appear in an exception message, a repr or a log line: errors
name the file, not its content.

``python -m replication.curve keygen DIR NAME`` writes a pair.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import stat
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import zmq
import zmq.auth.thread

log = logging.getLogger("anywan.bus.curve")

_Z85 = r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}"
_LINE = re.compile(r'^\s*(public-key|secret-key)\s*=\s*"(' + _Z85 + r')"\s*$')


class CurveKeyError(ValueError):
    """A key file that is missing, malformed or too widely readable."""


def _zpl(public: bytes, secret: bytes | None) -> str:
    lines = [
        "#   ****  anywan bus CURVE certificate  ****",
        "#   ZeroMQ CURVE Public Certificate"
        if secret is None
        else "#   ZeroMQ CURVE **Secret** Certificate: DO NOT PROVIDE THIS FILE TO OTHER USERS",
        "metadata",
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create ``path`` with ``mode`` from the first byte (O_EXCL: never overwrite)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>.key`` (0600, public+secret) and ``<name>.pub``; return (pub, key).

    Refuses to overwrite an existing pair: replacing control's server key
    would silently cut every worker off the bus.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise CurveKeyError(f"bad key name {name!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    for p in (key_path, pub_path):
        if p.exists():
            raise CurveKeyError(f"{p} exists; refusing to overwrite a key")
    _write_new(key_path, _zpl(public, secret), 0o600)
    _write_new(pub_path, _zpl(public, None), 0o644)
    return pub_path, key_path


def _parse(path: Path) -> dict[str, bytes]:
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise CurveKeyError(f"cannot read key file {path}: {type(exc).__name__}") from None
    found: dict[str, bytes] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            found[m.group(1)] = m.group(2).encode("ascii")
    return found


def load_public(path: Path | str) -> bytes:
    """The z85 public key from a ``.pub`` or ``.key`` file."""
    found = _parse(Path(path))
    if "public-key" not in found:
        raise CurveKeyError(f"{path} holds no CURVE public key")
    return found["public-key"]


def load_secret(path: Path | str) -> tuple[bytes, bytes]:
    """(public, secret) z85 from a ``.key`` file readable by its owner only."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CurveKeyError(f"cannot read key file {path}: {type(exc).__name__}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CurveKeyError(f"{path} is accessible by group/others (mode {mode & 0o777:o})")
    found = _parse(path)
    if "public-key" not in found or "secret-key" not in found:
        raise CurveKeyError(f"{path} holds no CURVE key pair")
    public = found["public-key"]
    if zmq.curve_public(found["secret-key"]) != public:
        raise CurveKeyError(f"{path}: public key does not match the secret key")
    return public, found["secret-key"]


def load_allowed(paths: Iterable[Path | str]) -> list[bytes]:
    """Public keys from files, or from every ``*.pub`` in a directory."""
    keys: list[bytes] = []
    for p in map(Path, paths):
        files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
        keys.extend(load_public(f) for f in files)
    return keys


class AllowList:
    """ZAP for one ZeroMQ context: CURVE clients whose public key is listed.

    A client whose key is not listed fails the handshake and receives nothing.
    The list can change at run time (:meth:`allow`, :meth:`deny`); new
    connections see the change, established ones keep their session.
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], keys: Iterable[bytes]) -> None:
        self._keys = {bytes(k) for k in keys}
        self._lock = threading.Lock()
        for k in self._keys:
            _check_public(k)
        self._auth = zmq.auth.thread.ThreadAuthenticator(
            context, log=logging.getLogger("anywan.bus.zap")
        )
        self._started = False

    def start(self) -> None:
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)
        self._started = True

    def stop(self) -> None:
        if self._started:
            self._auth.stop()
            self._started = False

    def allow(self, key: bytes) -> None:
        _check_public(key)
        with self._lock:
            self._keys.add(bytes(key))

    def deny(self, key: bytes) -> None:
        with self._lock:
            self._keys.discard(bytes(key))

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook; ``key`` is the z85 client key."""
        with self._lock:
            return bytes(key) in self._keys


def _check_public(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != 40:
        raise CurveKeyError("a CURVE public key is 40 bytes of z85")


def configure_server(sock: zmq.Socket[bytes], public: bytes, secret: bytes) -> None:
    """Make ``sock`` a CURVE server (call before bind)."""
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def configure_client(
    sock: zmq.Socket[bytes], server_public: bytes, public: bytes, secret: bytes
) -> None:
    """Make ``sock`` a CURVE client of ``server_public`` (call before connect)."""
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replication.curve")
    sub = parser.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="write <name>.key (0600) and <name>.pub")
    kg.add_argument("directory", type=Path)
    kg.add_argument("name")
    args = parser.parse_args(argv)
    try:
        pub, key = generate_keypair(args.directory, args.name)
    except (CurveKeyError, OSError) as exc:
        print(f"keygen: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {key} (secret, mode 0600) and {pub} (public)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
