"""Pure Standard Webhooks signing (https://www.standardwebhooks.com/).

The signed content is `{webhook-id}.{webhook-timestamp}.{body}`, HMAC-SHA256, base64, sent as
`webhook-signature: v1,<signature>`; with several secrets (a rotation), one `v1,` signature per
secret, space-separated, so a receiver holding either secret verifies the request.

A configured secret must be what the spec says, `whsec_` and the base64 of 24 to 64 bytes
(`config_key`). A row's secret (`secret_column`) keeps the older, looser rule for compatibility
(`secret_key`): `whsec_<base64>` is decoded, any other text is used as raw bytes.

A receiver with its own convention may instead get one HMAC-SHA256 of the body alone
(`body_hmac`), in a header, prefix and encoding of its choosing (relay.request).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence

PREFIX = "whsec_"
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64


def secret_key(secret: str) -> bytes:
    """A row's secret as an HMAC key. The ValueError never quotes the secret."""
    if secret.startswith(PREFIX):
        try:
            return base64.b64decode(secret[len(PREFIX) :], validate=True)
        except binascii.Error as exc:
            raise ValueError(
                "a secret starting with 'whsec_' must be followed by base64; "
                "drop the prefix to use the text as the key"
            ) from exc
    return secret.encode()


def config_key(secret: str) -> bytes:
    """A configured secret as an HMAC key: `whsec_` + base64 of 24 to 64 bytes, or ValueError
    saying what is wrong (never quoting the secret)."""
    fix = (
        "a Standard Webhooks secret is 'whsec_' followed by the base64 of 24 to 64 random "
        'bytes; make one with: python3 -c "import base64, os; '
        "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
    )
    if not secret.startswith(PREFIX):
        raise ValueError(f"does not start with 'whsec_'; {fix}")
    try:
        key = base64.b64decode(secret[len(PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError(f"the text after 'whsec_' is not valid base64; {fix}") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"decodes to {len(key)} bytes; {fix}")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    content = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signatures(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one signature per key, space-separated."""
    return " ".join(sign(key, msg_id, timestamp, body) for key in keys)


def body_hmac(key: bytes, body: bytes, encoding: str) -> str:
    """HMAC-SHA256 of the body alone, as "hex" or "base64": the scheme of receivers that check
    one signature header over the raw body (GitHub's `X-Hub-Signature-256: sha256=<hex>`,
    Shopify's base64 `X-Shopify-Hmac-Sha256`, ...)."""
    digest = hmac.new(key, body, hashlib.sha256).digest()
    if encoding == "hex":
        return digest.hex()
    if encoding == "base64":
        return base64.b64encode(digest).decode()
    raise ValueError(f"unknown signature encoding {encoding!r}; use 'hex' or 'base64'")


def verify(key: bytes, msg_id: str, timestamp: int, body: bytes, header: str) -> bool:
    """True if any `v1,` signature in the (space-separated) header matches."""
    expected = sign(key, msg_id, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in header.split())
