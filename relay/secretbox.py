"""Encrypted secret columns: a row's secret kept encrypted at rest, decrypted by relay with keys
from the environment, several at once so keys can rotate.

The scheme (version 1), all of it:

    relay:v1:<key id>:<base64url(nonce || ciphertext || tag)>

- AES-256-GCM; the key is 32 random bytes, configured as base64.
- nonce: 12 random bytes, new for every encryption; tag: GCM's 16 bytes, appended to the
  ciphertext as most libraries return it.
- associated data: the ASCII text `relay:v1:<key id>`, the prefix up to the last colon, so the
  version and the key id cannot be changed without the tag failing.
- the plaintext is the secret's UTF-8 text.
- base64url (RFC 4648 section 5) without padding; padding is accepted when decrypting.
- key ids are 1 to 64 of A-Z a-z 0-9 _ - and are stored in the clear: a row names the key that
  decrypts it, so a new key can be added, new rows written with it, old rows re-encrypted at
  leisure and the old key dropped once no row names it.

Applications encrypt with `encrypt` here, `python -m relay.secretbox encrypt`, or any AES-GCM
library following the layout above. Errors name the key id and what to do; none quotes the text,
a key or the plaintext.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay import readers
from relay.readers import ConfigError

PREFIX = "relay"
VERSION = "v1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
# What of a malformed header may be shown: short, plain words, never anything like a secret.
_SHOWABLE = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
KEYGEN = "python -m relay.secretbox keygen"
KEY_ENV = "RELAY_SECRET_KEY"


class SecretError(Exception):
    """A value that cannot be decrypted; `reason` says why and what to do, and never holds the
    value, a key or the plaintext."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True, repr=False)
class Keyring:
    """The keys that may decrypt a source's secrets, by id. `where` is the config key they came
    from, named in every reason. The repr shows the ids, never a key."""

    where: str
    keys: Mapping[str, bytes] = field(hash=False)  # a read-only view; hashed by `where`

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError(f"{self.where}.keys: a keyring needs at least one key")
        for key_id, key in self.keys.items():
            _check_key_id(key_id)
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise ValueError(f"{self.where}.keys.{key_id}: a key is {KEY_BYTES} bytes")
        # A read-only copy: the caller's dict can change without changing the keyring.
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.keys))

    def __repr__(self) -> str:
        return f"Keyring(where={self.where!r}, ids={self.ids!r})"


def parse(where: str, data: Any, env: Mapping[str, str]) -> Keyring:
    """`[sources.X.secret_encryption]` (where = "sources.X.secret_encryption") as a Keyring:
    `keys = { k2 = { env = "K2" }, k1 = { env = "K1" } }`, each key the base64 of 32 bytes,
    given by reference (env or file) or, less wisely, in the file itself."""
    if not isinstance(data, dict):
        raise ConfigError(
            f'{where}: expected a table like keys = {{ k1 = {{ env = "PARTNER_KEY_1" }} }}'
        )
    readers.unknown(where, data, {"keys"})
    keys = data.get("keys")
    if not isinstance(keys, dict) or not keys:
        raise ConfigError(
            f"{where}.keys: expected at least one key by id, like "
            f'keys = {{ k1 = {{ env = "PARTNER_KEY_1" }} }}; make a key with: {KEYGEN}'
        )
    out: dict[str, bytes] = {}
    for key_id, ref in keys.items():
        key_where = f"{where}.keys.{key_id}"
        if not KEY_ID.match(key_id):
            raise ConfigError(
                f"{where}.keys: key id {key_id!r} is not 1 to 64 letters, digits, _ or -"
            )
        text = readers.value(key_where, ref, env)
        if not isinstance(text, str):
            raise ConfigError(
                f'{key_where}: expected {{ env = "NAME" }}, {{ file = "/path" }} or a string '
                f"holding the base64 of {KEY_BYTES} bytes"
            )
        out[key_id] = key_from_base64(key_where, text)
    return Keyring(where, out)


def key_from_base64(where: str, text: str) -> bytes:
    """A key from its base64 (standard or URL-safe alphabet, padding optional), or ConfigError
    naming `where` and never quoting the text."""
    fix = f"a key is the base64 of {KEY_BYTES} random bytes; make one with: {KEYGEN}"
    compact = "".join(text.split())
    try:
        if _BASE64.match(compact):
            key = _b64decode(compact, altchars=None)
        elif _BASE64URL.match(compact):
            key = _b64decode(compact, altchars=b"-_")
        else:
            raise ValueError("neither alphabet")
    except ValueError:
        raise ConfigError(f"{where}: not valid base64; {fix}") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{where}: decodes to {len(key)} bytes, not {KEY_BYTES}; {fix}")
    return key


def encrypt(key_id: str, key: bytes, plaintext: str, nonce: bytes | None = None) -> str:
    """`plaintext` encrypted under `key` as `relay:v1:<key_id>:<data>`. `nonce` is for tests and
    known-answer vectors only: a nonce used twice with one key gives the key's GCM authentication
    away, so leave it out and a random one is drawn."""
    _check_key_id(key_id)
    if len(key) != KEY_BYTES:
        raise ValueError(f"a key is {KEY_BYTES} bytes, got {len(key)}")
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    elif len(nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce is {NONCE_BYTES} bytes, got {len(nonce)}")
    header = f"{PREFIX}:{VERSION}:{key_id}"
    sealed = AESGCM(key).encrypt(nonce, plaintext.encode(), header.encode())
    data = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()
    return f"{header}:{data}"


def decrypt(keyring: Keyring, text: str) -> str:
    """The plaintext of `relay:v1:<key id>:<data>` (surrounding whitespace ignored), or
    SecretError saying which key, what is wrong and what to do."""
    keys_where = f"{keyring.where}.keys"
    if not text.strip():
        raise SecretError(
            "the value is empty; store the secret encrypted (relay:v1:<key id>:<data>)"
        )
    parts = text.strip().split(":")
    if len(parts) < 2 or parts[0] != PREFIX:
        raise SecretError(
            "the value is not relay-encrypted text (relay:v1:<key id>:<data>); encrypt it with "
            "relay.secretbox.encrypt or `python -m relay.secretbox encrypt`"
        )
    if parts[1] != VERSION:
        version = _show(parts[1])
        raise SecretError(
            f"the value is in format {version}, which this relay does not read (it reads "
            f"{VERSION}); upgrade relay or encrypt the value again with this one"
        )
    if len(parts) != 4:
        raise SecretError(
            f"the value has {len(parts)} ':'-separated parts, not 4 "
            f"(relay:{VERSION}:<key id>:<data>); it is truncated or corrupt: encrypt it again"
        )
    _, _, key_id, data = parts
    if not KEY_ID.match(key_id):
        raise SecretError(
            "the value's key id is not 1 to 64 letters, digits, _ or -; it is corrupt: "
            "encrypt it again"
        )
    key = keyring.keys.get(key_id)
    if key is None:
        raise SecretError(
            f"key id {key_id!r} is not in {keys_where} (it has {', '.join(keyring.ids)}); add it"
        )
    try:
        if not _BASE64URL.match(data):
            raise ValueError("not the base64url alphabet")
        raw = _b64decode(data, altchars=b"-_")
    except ValueError:
        raise SecretError(
            f"the data after key id {key_id!r} is not base64url; the value is corrupt: "
            f"encrypt it again"
        ) from None
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise SecretError(
            f"the data after key id {key_id!r} is {len(raw)} bytes, shorter than a nonce and a "
            f"tag ({NONCE_BYTES + TAG_BYTES}); the value is truncated: encrypt it again"
        )
    header = f"{PREFIX}:{VERSION}:{key_id}"
    try:
        plain = AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], header.encode())
    except InvalidTag:
        raise SecretError(
            f"the value does not decrypt with key {key_id!r} from {keys_where}: it was altered "
            f"or corrupted, or that key is not the one it was encrypted with; check the key's "
            f"variable, or encrypt the value again"
        ) from None
    try:
        return plain.decode()
    except UnicodeDecodeError:
        raise SecretError(
            f"the value decrypts with key {key_id!r} to bytes that are not UTF-8 text; "
            f"encrypt the secret's text, not raw bytes"
        ) from None


def _b64decode(text: str, altchars: bytes | None) -> bytes:
    """Strict base64 with padding optional; ValueError on any other character."""
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded, altchars=altchars, validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64") from exc


def _check_key_id(key_id: str) -> None:
    if not isinstance(key_id, str) or not KEY_ID.match(key_id):
        raise ValueError(f"key id {_show(key_id)} is not 1 to 64 letters, digits, _ or -")


def _show(value: object) -> str:
    """A piece of a malformed value, quoted only when it is a short plain word."""
    if isinstance(value, str) and _SHOWABLE.match(value):
        return repr(value)
    return "(not shown)"


# -- command line: for applications and operators, not for the relay process ------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m relay.secretbox",
        description="Encrypt secrets for relay's encrypted secret columns (AES-256-GCM).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    enc = sub.add_parser(
        "encrypt",
        help=f"encrypt stdin (one trailing line break dropped) with the key in ${KEY_ENV}",
    )
    enc.add_argument("--key-id", required=True, help="the key's id in secret_encryption.keys")
    sub.add_parser("keygen", help="print a new random key, base64 of 32 bytes")
    return p


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    stdin: IO[bytes] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Exit codes: 0 done, 2 a usage, key or input problem (said on stderr)."""
    env = os.environ if env is None else env
    stdin = sys.stdin.buffer if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    args = _parser().parse_args(argv)
    if args.command == "keygen":
        print(base64.b64encode(os.urandom(KEY_BYTES)).decode(), file=stdout)
        return 0
    prog = "relay.secretbox encrypt"
    if not KEY_ID.match(args.key_id):
        print(f"{prog}: --key-id: expected 1 to 64 letters, digits, _ or -", file=stderr)
        return 2
    text = env.get(KEY_ENV, "")
    if not text:
        print(
            f"{prog}: {KEY_ENV} is not set; set it to the base64 of key {args.key_id!r} (the "
            f"value of the variable its secret_encryption.keys entry names)",
            file=stderr,
        )
        return 2
    try:
        key = key_from_base64(KEY_ENV, text)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=stderr)
        return 2
    try:
        plaintext = stdin.read().decode()
    except UnicodeDecodeError:
        print(f"{prog}: stdin is not UTF-8 text", file=stderr)
        return 2
    plaintext = plaintext.removesuffix("\n").removesuffix("\r")
    if not plaintext:
        print(f"{prog}: stdin is empty; pipe the secret in", file=stderr)
        return 2
    print(encrypt(args.key_id, key, plaintext), file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
