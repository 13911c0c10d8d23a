"""Secrets at rest: the master key file, AES-GCM sealing, PSK and token generation.

The database never holds a PSK or key in the clear: every secret column is
``nonce || AES-256-GCM(master key, plaintext, aad)``, where the AAD names the
row the secret belongs to (``b"psk/<account_id>/<tunnel_id>"``, ``b"state/<key>"``),
so a ciphertext copied onto another row does not decrypt. The master key lives
in its own file, created with mode 0600 by ``os.open`` (no window in which it
is world-readable), so the database file alone reveals nothing (issue 7, "Store and secrets").

API tokens are not encrypted but hashed: a token is 256 random bits, so one
SHA-256 is enough (no password stretching needed), and the store only ever
compares hashes.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import string
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_KEY_BYTES = 32
NONCE_BYTES = 12
PSK_ALPHABET = string.ascii_letters + string.digits
PSK_LENGTH = 32
"""32 characters of [A-Za-z0-9]: ~190 bits, the shape Magic WAN's generated PSKs have."""
TOKEN_PREFIX = "awt_"


class SecretError(Exception):
    """A secret that cannot be loaded or opened. Messages never contain secret bytes."""


class MasterKey:
    """The 32-byte key that seals every secret in the store. ``repr`` hides it."""

    __slots__ = ("_aead", "path")

    def __init__(self, key: bytes, path: Path | None = None) -> None:
        if len(key) != MASTER_KEY_BYTES:
            raise SecretError(f"master key must be {MASTER_KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        self.path = path

    def __repr__(self) -> str:
        return f"MasterKey(path={self.path}, key=<hidden>)"

    @classmethod
    def create(cls, path: Path) -> MasterKey:
        """Write a fresh key to ``path`` (mode 0600, O_EXCL: never overwrite one)."""
        key = os.urandom(MASTER_KEY_BYTES)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SecretError(
                f"{path} already exists; refusing to overwrite a master key"
            ) from None
        try:
            os.write(fd, key.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(key, path)

    @classmethod
    def load(cls, path: Path) -> MasterKey:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise SecretError(f"master key file {path} does not exist (run `init`)") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(
                f"master key file {path} is accessible by group/others "
                f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
            )
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:  # the type only: no key bytes
            raise SecretError(
                f"cannot read master key file {path} ({type(exc).__name__})"
            ) from None
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise SecretError(f"master key file {path} is not hex") from None
        return cls(key, path)

    @classmethod
    def load_or_create(cls, path: Path) -> MasterKey:
        if path.exists():
            return cls.load(path)
        return cls.create(path)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < NONCE_BYTES + 16:
            raise SecretError("sealed secret too short")
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
        except InvalidTag:
            raise SecretError("sealed secret does not open with this master key") from None


def generate_psk() -> str:
    return "".join(secrets.choice(PSK_ALPHABET) for _ in range(PSK_LENGTH))


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
